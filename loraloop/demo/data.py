"""Data for the demo: a built-in intent generator, or any ``text,label`` CSV.

The generator writes customer-service utterances from templates and slot fillers, so
the demo runs without any data set. Texts of one intent share meaning, not wording:
several templates per intent, each with fillers, so a model has to generalise.

Example:
    >>> rows = generate_intents(per_label=5, seed=1)
    >>> len({label for _, label in rows}), len(rows)
    (12, 60)
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

_FILL = {
    "card": ["card", "debit card", "credit card", "visa card", "bank card"],
    "amount": ["20 dollars", "$150", "500 euros", "a hundred pounds", "75 bucks", "$1,200"],
    "person": ["my sister", "my landlord", "a friend", "my brother", "John", "my mom"],
    "item": ["order", "package", "parcel", "delivery", "shipment"],
    "when": ["yesterday", "this morning", "last week", "two days ago", "on Monday", "an hour ago"],
    "please": ["", "please ", "can you ", "could you ", "I need you to "],
    "hi": ["", "hi, ", "hello, ", "hey, ", "excuse me, "],
}

# intent -> templates; {slot} fields come from _FILL.
INTENTS: dict[str, list[str]] = {
    "check_balance": ["{hi}how much money is in my account", "{hi}what is my current balance",
                      "{please}show me my account balance", "{hi}how much do I have left to spend",
                      "{hi}what's the balance on my checking account"],
    "lost_card": ["{hi}I lost my {card} {when}", "{hi}my {card} is missing", "{please}block my {card}, I can't find it",
                  "{hi}I think I left my {card} somewhere {when}", "{hi}someone may have my {card}, it's gone"],
    "transfer_money": ["{please}send {amount} to {person}", "{hi}I want to transfer {amount} to {person}",
                       "{hi}how do I move {amount} to {person}'s account", "{please}wire {amount} to {person}",
                       "{hi}pay {person} {amount} from my account"],
    "reset_password": ["{hi}I forgot my password", "{please}reset my password", "{hi}I can't log in, the password is wrong",
                       "{hi}how do I change my login password", "{hi}locked out of the app after too many attempts"],
    "track_order": ["{hi}where is my {item}", "{please}track my {item}", "{hi}my {item} hasn't arrived since {when}",
                    "{hi}when will my {item} be delivered", "{hi}what's the status of the {item} I placed {when}"],
    "refund_request": ["{hi}I want my money back for the {item}", "{please}refund my {item}",
                       "{hi}how do I get a refund for what I bought {when}", "{hi}the {item} was broken, I want a refund",
                       "{hi}return the {item} and give me back {amount}"],
    "cancel_order": ["{please}cancel my {item}", "{hi}I don't want the {item} I placed {when} anymore",
                     "{hi}stop the {item} before it ships", "{hi}how do I cancel an {item}",
                     "{hi}cancel everything I ordered {when}"],
    "change_address": ["{hi}I moved, update my address", "{please}change my home address",
                       "{hi}my address is wrong on the account", "{hi}how do I edit my mailing address",
                       "{hi}I have a new address since {when}"],
    "report_fraud": ["{hi}there's a charge of {amount} I didn't make", "{hi}someone used my {card} without permission",
                     "{hi}I see a payment {when} that isn't mine", "{please}report a fraudulent transaction of {amount}",
                     "{hi}my account was hacked {when}"],
    "open_account": ["{hi}I want to open a new account", "{please}help me sign up for a savings account",
                     "{hi}how do I create an account for {person}", "{hi}can I open a joint account with {person}",
                     "{hi}what do I need to become a customer"],
    "card_declined": ["{hi}my {card} was declined {when}", "{hi}why did my payment of {amount} fail",
                      "{hi}the shop refused my {card}", "{hi}my {card} isn't working at the store",
                      "{hi}transaction declined when I paid {amount}"],
    "exchange_rate": ["{hi}what's the exchange rate for euros", "{hi}how many dollars is {amount}",
                      "{hi}what rate do you use to convert {amount}", "{please}tell me today's currency rates",
                      "{hi}how much will I get if I exchange {amount}"],
}


def _render(template: str, rng: random.Random) -> str:
    out = template
    for slot, options in _FILL.items():
        while "{" + slot + "}" in out:
            out = out.replace("{" + slot + "}", rng.choice(options), 1)
    text = out.strip()
    return text[0].upper() + text[1:] + rng.choice(["", "?", ".", "!"] if not text.endswith("?") else [""])


def generate_intents(per_label: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """``per_label`` utterances for each built-in intent, as (text, label), shuffled."""
    rng = random.Random(seed)
    rows = [(_render(rng.choice(templates), rng), label)
            for label, templates in INTENTS.items() for _ in range(per_label)]
    rng.shuffle(rows)
    return rows


def load_csv(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """Rows of a CSV as (text, label); clear errors for missing columns or empty files."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; has {reader.fieldnames}. "
                             "Use --text-column / --label-column.")
        rows = [(r[text_column].strip(), r[label_column].strip()) for r in reader
                if r[text_column] and r[text_column].strip() and r[label_column]]
    if not rows:
        raise ValueError(f"{path}: no rows with both {text_column!r} and {label_column!r}")
    return rows
