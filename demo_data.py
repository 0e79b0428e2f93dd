"""Built-in demo data, generated deterministically from a seed (no download needed).

STUB: to be replaced by the full generator (pretraining corpus + dialog task families).
"""

import random


def pretrain_documents(seed: int = 0, n_docs: int = 2000) -> list[str]:
    """Simple English documents for the demo pretraining corpus."""
    rng = random.Random(seed)
    names = ["Anna", "Ben", "Cara", "Dan"]
    things = ["apple", "book", "cup", "dog"]
    return [" ".join(f"{rng.choice(names)} has a {rng.choice(things)}." for _ in range(rng.randint(3, 12)))
            for _ in range(n_docs)]
