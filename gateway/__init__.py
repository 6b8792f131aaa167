"""The HTTP gateway: an edge for clients that cannot speak Kafka (``loraloop gateway``).

It only produces requests and feedback and waits for predictions; the workers stay the only
place where the model runs. Imports ``loraloop`` only.
"""
