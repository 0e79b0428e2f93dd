"""Built-in demo data, generated deterministically from a seed (no download needed).

  pretrain_documents(seed=0)      simple English text for the demo pretraining corpus (tokenize_data.py);
  dialogs(split, seed=0)          conversations (lists of {"role", "content"} messages) for fine-tuning;
  examples(split, seed=0)         the same with their task family and reference answer:
                                  {"family", "messages" (ending with the reference answer), "answer"};
  python demo_data.py --out DIR   writes DIR/{train,val,eval}.jsonl ({"messages": [...]}) to look at.

split is "train" or "val" (fine-tuning and its validation loss) or "eval" (the held-out instruction-following
suite of evaluate.py). Six task families, every answer exactly checkable (`check`):
  copy       "Repeat exactly:\nThe cup lamp tree."                 -> the sentence itself
  recall     a fact, one to three other exchanges, then a question -> "Your pet is called Rex."
             about the fact (fine-tuning: zero to three)
  list       reverse / first / last / count of a list of words      -> "The list ends with tree."
  arithmetic "What is 7 + 5?" / "What is 12 - 5?"                   -> "7 + 5 = 12."
  compare    "Is 37 greater than 52?" / "... less than ...?"       -> "No." / "Yes."
  system     a system prompt asks to sign every answer with a name -> "<answer> - Mira"

Held out: every dialog of the "eval" split is new (a fresh draw of sentences, lists, facts and signatures, which
the model must read from the conversation: no answer can be memorized), and the operand pairs of arithmetic and
comparison are split once (by a hash of the pair, whatever the seed) into a training part and an evaluation
part, so no sum or comparison that the suite asks about ever occurs in a fine-tuning dialog. The words, names and
recall numbers are shared: fine-tuning pushes down every token its answers never contain (Adam moves even
rarely used embedding rows at full speed), and with the words split the tuned model answered with training
words instead of copying the held-out ones (BENCHMARKS.md, "Demo").
Every filler is a single GPT-2 token after a space (" tree", " Mira", " 213"), and answers are phrased so
that fillers are always preceded by a space, so copying a word means copying its token.

The pretraining corpus is different text (stories, repeated phrases, lists, counting, sums and comparisons
written out as sentences) over all words and names and ALL operand pairs: like a real pretraining corpus,
it holds the knowledge the suite asks for (the words and numbers, that 7 + 5 = 12, that 37 is less than 52),
but never a task in the chat format. So the suite measures whether fine-tuning taught the model
to follow instructions and use its context and its knowledge, on dialogs and questions it was never tuned on.
"""

import json
import os
import random
import sys
import zlib
from pathlib import Path

# Every word below is one GPT-2 token when preceded by a space (tests/test_demo_data.py checks it).
NOUNS = """apple ball bank bed bell bird boat book boot bowl box bread brick bridge brush bus cake camera candle car
card carpet cat chair chalk cheese chicken clock cloud coat coin cookie corn cow crown cup desk dog doll dragon
drum duck eagle egg engine fan farm feather fence field fish flag flower fork fox frog garden gate ghost gift glass
glove goat gold grape grass guitar hammer hat hill horse house ice island jacket jar jelly kettle key king knife
ladder lake lamp leaf lemon letter lion lock map mask milk mirror monkey moon mouse mug nail needle nest net oak
ocean onion orange owl paint pan paper pen pencil pepper piano pig pillow pipe plate pocket pond potato pot puppy
queen rabbit radio rain ring river road robot rock roof rope rose salt sand scarf sheep shell ship shirt shoe shop
silver sink snake snow soap sock sofa spoon star stone storm sugar sun table tail tea tent tiger tire toast tomato
tower toy train tree truck tunnel turtle umbrella wall watch water whale wheel window wolf wood worm yard tooth beach
pear peach plum banana carrot button basket blanket bottle bucket candy castle cherry circle comb crab crow deer
diamond dolphin forest frame gem goose honey hook jewel lantern lizard magnet marble mountain olive oven pearl pie
pizza planet pumpkin puzzle rocket saddle salad seal shark shelf sponge squirrel stamp statue stove sweater sword
tablet towel trumpet valley wallet whistle wing wizard yogurt arrow bench blade cabin canoe cannon cart cave chain
chess cliff coal copper cotton crystal dinner dust fountain helmet iron jungle kitten leather marsh medal mint mud
nut orbit palace parade pasta pillar pine plane pool rice ribbon rifle sail sauce seed silk skirt sled spider spring
steam stick straw stream string temple thread throne thunder ticket torch tractor tray trunk valve velvet village wax
web wheat wire zoo""".split()
NAMES = """Anna Ben Dan Emma Finn Gina Hugo Iris Jack Kate Leo Mia Nina Omar Paul Rosa Sam Tina Victor Wendy Zoe Alice
Bob Carl David Eve Frank Grace Henry Ivan Jane Kevin Laura Mark Nora Oscar Peter Rachel Steve Tom Vera Will Adam
Bella Chris Diana Eric Fiona George Helen Ian Julia Karl Lily Mike Nick Pete Quinn Ruby Sara Tony Vince Wade Amy Bill
Clara Derek Fred Greg Holly Isaac Jill Kyle Lucy Max Ned Owen Paula Ray Rita Sean Ted Val Walt Alan Beth Chloe Dean
Eli Gus Hank Ivy Joe Kim Luke Mary Neil Otto Pam Rex Rose Seth Troy Vic Abby Bruce Cole Ethan Felix Hans Jon Kurt
Lena Noah Olive Phil Ralph Sophie Tess Abe Boris Cindy Dylan Edgar Glen Heidi Igor Josh Kira Lars Milo Pablo Remy
Simon Theo Yuri Zack""".split()
NAMES = [n for n in NAMES if n not in ("Rose", "Olive")]  # also nouns: a filler belongs to one pool only
RECALL_NUMBERS = range(100, 360)  # " 100" ... " 359" are single tokens
OPERANDS = range(0, 21)  # arithmetic operands; sums up to 40 and differences down to 0
SUMS = [(a, b, op) for a in OPERANDS for b in OPERANDS for op in "+-" if op == "+" or a >= b]
PAIRS = [(a, b) for a in range(100) for b in range(100) if a != b]  # comparisons of two numbers below 100
EVAL_EVERY = 4  # one operand pair in EVAL_EVERY is held out for the evaluation split

FAMILIES = ("copy", "recall", "list", "arithmetic", "compare", "system")
SPLIT_SIZES = {"train": 3000, "val": 40, "eval": 50}  # dialogs per family
SPLIT_SEEDS = {"train": 0, "val": 1, "eval": 2}  # combined with the caller's seed


def _held_out(pair) -> bool:
    """Whether an operand pair belongs to the evaluation part: a fixed hash, not the seed."""
    return zlib.crc32(repr(pair).encode()) % EVAL_EVERY == 0


def pools(split: str) -> dict:
    """The fillers a split may use (all words, names and recall numbers, and its part of the operand pairs), and
    how many other exchanges its recall dialogs put between a fact and the question about it."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_SEEDS)}")
    want = split == "eval"
    return {"nouns": NOUNS, "names": NAMES, "numbers": list(RECALL_NUMBERS),
            "sums": [x for x in SUMS if _held_out(x) == want], "pairs": [x for x in PAIRS if _held_out(x) == want],
            # other exchanges between a recall fact and its question: the suite asks 1-3 exchanges later, fine-tuning
            # also right after the fact, which a model that copies from its context learns first and then extends
            # (without it, fine-tuning from some pretraining runs never learned to look back: BENCHMARKS.md, Demo)
            "recall_gap": (1, 3) if want else (0, 3)}


# ---- the task families: each returns (messages, answer); messages end with the answer ------------------------

def _words(rng, p, lo, hi):
    return rng.sample(p["nouns"], rng.randint(lo, hi))


def _copy(rng, p):
    # The text starts on its own line, so its first word is the same token in the prompt and in the answer.
    sentence = rng.choice(["The", "A", "My", "Our", "This"]) + " " + " ".join(_words(rng, p, 2, 5)) + "."
    prompt = rng.choice(["Repeat exactly:\n{}", "Please repeat this exactly:\n{}", "Say exactly this:\n{}",
                         "Copy this text:\n{}", "Repeat after me:\n{}"])
    return [{"role": "user", "content": prompt.format(sentence)}], sentence


def _list(rng, p):
    items = _words(rng, p, 2, 5)
    shown = ", ".join(items)
    op = rng.choice(["reverse", "first", "last", "count"])
    if op == "reverse":
        q = rng.choice(["Reverse the list: {}", "Write this list backwards: {}"])
        a = "In reverse: " + ", ".join(reversed(items)) + "."
    elif op == "first":
        q = rng.choice(["What is the first item of the list: {}?", "Which item comes first in: {}?"])
        a = f"The list starts with {items[0]}."
    elif op == "last":
        q = rng.choice(["What is the last item of the list: {}?", "Which item comes last in: {}?"])
        a = f"The list ends with {items[-1]}."
    else:
        q = rng.choice(["How many items are in the list: {}?", "Count the items: {}"])
        a = f"There are {len(items)} items."
    return [{"role": "user", "content": q.format(shown)}], a


def _arithmetic(rng, p):
    a, b, op = rng.choice(p["sums"])
    q = rng.choice(["What is {} {} {}?", "Compute {} {} {}.", "How much is {} {} {}?"])
    result = a + b if op == "+" else a - b
    return [{"role": "user", "content": q.format(a, op, b)}], f"{a} {op} {b} = {result}."


def _compare(rng, p):
    a, b = rng.choice(p["pairs"])
    if rng.random() < 0.5:
        q, yes = rng.choice(["Is {} greater than {}?", "Is {} bigger than {}?"]), a > b
    else:
        q, yes = rng.choice(["Is {} less than {}?", "Is {} smaller than {}?"]), a < b
    return [{"role": "user", "content": q.format(a, b)}], "Yes." if yes else "No."


SIMPLE = (_copy, _list, _arithmetic, _compare)

# (statement, acknowledgement, question, answer) with {} the filler; each kind draws from one pool.
FACTS = {
    "names": [("My name is {}.", "Nice to meet you, {}.", "What is my name?", "Your name is {}."),
              ("My pet is called {}.", "What a nice name for a pet.", "What is my pet called?",
               "Your pet is called {}."),
              ("My best friend is {}.", "Good to know.", "Who is my best friend?", "Your best friend is {}.")],
    "nouns": [("The secret word is {}.", "I will remember the secret word.", "What is the secret word?",
               "The secret word is {}."),
              ("My favorite thing is the {}.", "Noted.", "What is my favorite thing?",
               "Your favorite thing is the {}.")],
    "numbers": [("My lucky number is {}.", "I will remember it.", "What is my lucky number?",
                 "Your lucky number is {}."),
                ("The door code is {}.", "Got it.", "What is the door code?", "The door code is {}.")],
}

POOLED_FACTS = [(pool, fact) for pool, facts in FACTS.items() for fact in facts]  # (pool of the filler, fact)


def _recall(rng, p):
    # A fact, then one to three other exchanges (fine-tuning: zero to three, pools), then a question about the
    # fact: the answer is only in the conversation, several turns back. The answer repeats the statement's words
    # before the value ("... name is Mira."), which the model finds again in the context to copy what followed it.
    pool, (statement, ack, question, answer) = rng.choice(POOLED_FACTS)
    value = rng.choice(p[pool])
    messages = [{"role": "user", "content": statement.format(value)}, {"role": "assistant", "content": ack.format(value)}]
    for _ in range(rng.randint(*p["recall_gap"])):
        turn, reply = rng.choice(SIMPLE)(rng, p)
        messages += turn + [{"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": question}], answer.format(value)


def _system(rng, p):
    name = rng.choice(p["names"])
    system = rng.choice(["Always sign your answers with the name {}.", "End every answer with the signature {}.",
                         "You are a helpful assistant. Sign every answer as {}."]).format(name)
    messages = [{"role": "system", "content": system}]
    for _ in range(rng.randint(0, 1)):  # sometimes an earlier signed exchange first
        turn, answer = rng.choice(SIMPLE)(rng, p)
        messages += turn + [{"role": "assistant", "content": f"{answer} - {name}"}]
    turn, answer = rng.choice(SIMPLE)(rng, p)
    return messages + turn, f"{answer} - {name}"


GENERATORS = {"copy": _copy, "recall": _recall, "list": _list, "arithmetic": _arithmetic, "compare": _compare,
              "system": _system}


def examples(split: str, seed: int = 0, per_family: int | None = None) -> list[dict]:
    """{"family", "messages", "answer"} dialogs of a split, families interleaved; the messages end with the answer."""
    p = pools(split)
    rng = random.Random(f"{seed}-{SPLIT_SEEDS[split]}")
    n = SPLIT_SIZES[split] if per_family is None else per_family
    out = []
    for _ in range(n):
        for family in FAMILIES:
            messages, answer = GENERATORS[family](rng, p)
            out.append({"family": family, "messages": messages + [{"role": "assistant", "content": answer}],
                        "answer": answer})
    return out


def dialogs(split: str, seed: int = 0) -> list[list[dict]]:
    """The conversations of a split (for finetune.py when --data is not given)."""
    return [e["messages"] for e in examples(split, seed)]


def check(example: dict, output: str) -> bool:
    """Exact match of the model's reply with the reference answer (surrounding whitespace ignored)."""
    return output.strip() == example["answer"]


# ---- the pretraining corpus -----------------------------------------------------------------------------------

NUMBER_WORDS = "one two three four five six seven eight nine ten".split()


def _story(rng, names, nouns):
    a, b = rng.sample(names, 2)
    x, y, z = rng.sample(nouns, 3)
    sentences = [f"{a} has a {x}.", f"{b} has a {y} and a {z}.", f"{a} gives the {x} to {b}.",
                 f"Now {b} has the {x}, the {y} and the {z}.", f"{a} looks for a {z}.",
                 f"The {y} is next to the {x}.", f"{b} likes the {z} more than the {y}.",
                 f"{a} and {b} play with the {x}.", f"Where is the {x}? The {x} is with {b}."]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(4, len(sentences))])


def _repeat(rng, names, nouns):
    # Copying: a phrase of random words (and numbers) said again later, which teaches induction (look back, copy
    # what followed).
    a, b = rng.sample(names, 2)
    phrase = " ".join(str(rng.choice(RECALL_NUMBERS)) if rng.random() < 0.2 else word  # numbers are copied too
                      for word in rng.sample(nouns, rng.randint(2, 7)))
    return rng.choice([f"{a} said: the {phrase}. {b} said it again: the {phrase}.",
                       f"{a} wrote the words {phrase}. Then {b} wrote the same words: {phrase}.",
                       f"Say the {phrase}. Once more: the {phrase}. And again: the {phrase}."])


def _lists(rng, names, nouns):
    a = rng.choice(names)
    items = rng.sample(nouns, rng.randint(2, 7))
    k = len(items)
    return (f"{a} has a list: {', '.join(items)}. It has {NUMBER_WORDS[k - 1]} items, {k} in all. "
            f"It starts with {items[0]} and ends with {items[-1]}. "
            f"From the end it reads: {', '.join(reversed(items))}.")


def _facts(rng, names, nouns):
    # A fact, other sentences, then the fact used again: the same look-back as multi-turn recall.
    a, b = rng.sample(names, 2)
    x, y = rng.sample(nouns, 2)
    return (f"{a} has a friend called {b}. {a} also has a {x} and a {y}. The {y} is old. "
            f"Who is the friend of {a}? It is {b}. What does {a} have? A {x} and a {y}.")


# A sum is written alone, and also after the same expression was named (as a dialog's answer repeats its question):
# a fact learned in one context only is not recalled in another (the model knows "... 10 + 19 =" -> 29 in counting
# text, but not after "What is 10 + 19?": BENCHMARKS.md, Demo).
SUM_CONTEXTS = ["{s} = {r}.", "{name} asks about {s}. {s} = {r}.", "Now {s}: {s} = {r}."]


def _numbers(rng):
    # Counting, sums and comparisons written out as sentences, over ALL operand pairs: what the model knows of
    # numbers comes from here, as a real model's knowledge comes from its pretraining corpus. (A number that
    # never occurs here would enter fine-tuning with the same embedding as every other unseen id: --data_vocab.)
    start = rng.randint(0, RECALL_NUMBERS[-1] - 9)  # up to the largest recall number: every number is known
    sums = [rng.choice(SUM_CONTEXTS).format(s=f"{a} {op} {b}", r=a + b if op == "+" else a - b,
                                            name=rng.choice(NAMES)) for a, b, op in rng.sample(SUMS, 6)]
    comparisons = [f"{c} is {rng.choice(['greater', 'bigger', 'more']) if c > d else rng.choice(['less', 'smaller'])}"
                   f" than {d}." for c, d in rng.sample(PAIRS, 1)]
    return " ".join([f"We count: {', '.join(str(i) for i in range(start, start + rng.randint(3, 6)))}.",
                     *sums, *comparisons])


def _said_twice(rng, p, paragraphs):
    # Someone states a fact, one to three other paragraphs follow, then the fact is said again: the look-back of
    # multi-turn recall (find "lucky number is" 30-150 tokens back, copy what followed). Spread over a whole
    # document the gap was mostly longer than a 256-token window, where it teaches nothing.
    pool, (statement, *_) = rng.choice(POOLED_FACTS)
    a, fact = rng.choice(NAMES), statement.format(rng.choice(p[pool]))
    start = rng.randint(0, len(paragraphs) - 1)
    end = start + rng.randint(1, 3)
    return [*paragraphs[:start], f'{a} said: "{fact}"', *paragraphs[start:end], f'Later {a} said it again: "{fact}"',
            *paragraphs[end:]]


def pretrain_documents(seed: int = 0, n_docs: int = 6000) -> list[str]:
    """Simple English documents for the demo pretraining corpus: each a few short paragraphs."""
    rng = random.Random(f"pretrain-{seed}")
    p = pools("train")  # its words, names and numbers are all of them (see the module docstring)
    # Copying is what the dialog tasks need most (and what a small model learns last), so almost half the
    # paragraphs are repeated phrases.
    makers = [(_story, 1), (_repeat, 8), (_lists, 2), (_facts, 2)]
    makers = [lambda f=f: f(rng, NAMES, NOUNS) for f, weight in makers for _ in range(weight)]
    makers += [lambda: _numbers(rng)] * 2
    docs = []
    for _ in range(n_docs):
        paragraphs = [rng.choice(makers)() for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(_said_twice(rng, p, paragraphs) if rng.random() < 0.75 else paragraphs))
    return docs


def write_jsonl(out_dir, seed: int = 0) -> list[Path]:
    """DIR/{train,val,eval}.jsonl in the chat format ({"messages": [...]}, plus "family"); atomic writes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLIT_SEEDS:
        path = out / f"{split}.jsonl"
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for e in examples(split, seed):
                f.write(json.dumps({"messages": e["messages"], "family": e["family"]}) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) != 2 or args[0] != "--out":
        sys.exit("usage: python demo_data.py --out DIR   (writes DIR/train.jsonl, val.jsonl, eval.jsonl)")
    for path in write_jsonl(args[1]):
        print(f"wrote {path}")
