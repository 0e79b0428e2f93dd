"""Built-in demo data, generated deterministically from a seed (no download needed).

  pretrain_documents(seed=0)      simple English prose for the demo pretraining corpus (tokenize_data.py);
  examples(split, seed=0)         dialogs with their task family, reference answer and what is held out:
                                  {"family", "held_out", "messages" (ending with the answer), "answer"};
  dialogs(split, seed=0)          the conversations alone, for fine-tuning;
  python demo_data.py --out DIR [--seed N]   writes DIR/{train,val,eval}.jsonl ({"messages": [...]}).

split is "train" or "val" (fine-tuning and its validation loss) or "eval" (evaluate.py's held-out suite). The demo
model is a small assistant inside a small world. Nine task families, every answer exactly checkable (`check`):
  copy        "Repeat after me:\\nThe cup lamp tree."                 -> the sentence itself
  list        reverse / first / last / count of a list of words     -> "The list ends with tree."
  arithmetic  "What is 7 + 5?", "Subtract 5 from 12."               -> "7 + 5 = 12."
  compare     "Is 37 larger than 52?"                               -> "No, 37 is less than 52."
  recall      a fact, one to three other exchanges, a question      -> "Your pet is called Rex."
  rules       a system prompt's rule over several turns: sign with a name, start with a word, answer only yes
              or no, never reveal a password (a polite refusal)
  support     a system prompt describing a business (opening hours by day, prices, delivery days, a phone
              number): questions answered from it; anything it does not say gets a fallback with the number
  booking     a table booking over several turns, given in any order: the assistant asks for what is
              missing (name, day, people) and then confirms all three
  greeting    hello, who are you, what can you do, thanks (the name from the system prompt, or Parley), and
              a short fallback for requests outside its world
Fine-tuning also answers requests in words outside the corpus ("Explain quantum physics.") with that fallback
(TRAIN_ONLY "unknown"). The suite does not score them, as its words are all in the corpus; unknown_requests(seed)
asks them in other words and wordings, for evaluate.py's report.

Every task is asked in many wordings: cores (each holding the task's key word, e.g. reverse / backwards /
opposite order) combined with polite prefixes. Held out: some whole cores and one key word per task occur only
in the "eval" split (WORDINGS marks them with "~"), and half of the eval dialogs use them ("held_out" is
"wording"); the other half use the tuned wordings with new fillers ("filler"). In the "train" split most wordings
have a word or more added or left out (_edit_words), so that fine-tuning teaches the task rather than its template.
Every eval dialog is a fresh draw of words, names, businesses and facts, and the operand pairs of arithmetic and
comparison are split once (by a hash of the pair, whatever the seed), so no sum or comparison the suite asks about
is ever tuned on.

The pretraining corpus is different text: stories, lists, sums and comparisons written out as sentences, shops and
bookings described in prose, people greeting each other. It uses every key word, the held-out ones too, in the
sense the tasks give them ("In the opposite order the list reads ..."), and says the other ways of putting a thing
next to the form the answers use ("the sum of 3 and 4 is 7, so 3 + 4 = 7"; "they charge 4 dollars for the cake:
the cake costs 4 dollars"), but never a task in the chat format and never a held-out core. So the suite measures whether fine-tuning taught the model to follow instructions, in
words it knows from pretraining but was never tuned on.
Fillers are single GPT-2 tokens after a space (" tree", " Mira", " 213"), and answers put a space before them,
so copying a word means copying its token.
"""

import json
import os
import random
import re
import sys
import zlib
from functools import lru_cache
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
Eli Gus Hank Ivy Joe Kim Luke Mary Neil Otto Pam Rex Seth Troy Vic Abby Bruce Cole Ethan Felix Hans Jon Kurt
Lena Noah Phil Ralph Sophie Tess Abe Boris Cindy Dylan Edgar Glen Heidi Igor Josh Kira Lars Milo Pablo Remy
Simon Theo Yuri Zack""".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
KINDS = "Cafe Kitchen Shop Store Garden Market".split()  # "Anna's Cafe"
START_WORDS = "Sure Okay Well Right Indeed Alright Certainly Great Fine Good Done Hello".split()
RECALL_NUMBERS = range(100, 360)  # " 100" ... " 359" are single tokens
OPERANDS = range(0, 21)  # arithmetic operands; sums up to 40 and differences down to 0
SUMS = [(a, b, op) for a in OPERANDS for b in OPERANDS for op in "+-" if op == "+" or a >= b]
PAIRS = [(a, b) for a in range(100) for b in range(100) if a != b]  # comparisons of two numbers below 100
EVAL_EVERY = 4  # one operand pair in EVAL_EVERY is held out for the evaluation split
DEFAULT_NAME = "Parley"  # the assistant's name when no system prompt gives one

FAMILIES = ("copy", "list", "arithmetic", "compare", "recall", "rules", "support", "booking", "greeting")
TRAIN_ONLY = ("unknown",)  # requests in words outside the corpus (UNKNOWN_WORDS): fine-tuning only, never scored
# Dialogs per family. The suite (eval) is large enough that a family's score measures the model rather than the
# draw of its dialogs (BENCHMARKS.md, Demo).
SPLIT_SIZES = {"train": 2500, "val": 30, "eval": 250}
# The training split's share of each family, times SPLIT_SIZES["train"]: more dialogs for the skills a small model
# learns last (looking a value up in the support bot's prompt, bookings), fewer for those it learns first.
TRAIN_WEIGHTS = {"copy": 0.6, "list": 1, "arithmetic": 1, "compare": 0.6, "recall": 1, "rules": 1, "support": 2.4,
                 "booking": 1.4, "greeting": 0.6, "unknown": 0.24}
SPLIT_SEEDS = {"train": 0, "val": 1, "eval": 2}  # combined with the caller's seed

# ---- wordings ---------------------------------------------------------------------------------------------------
# A core starting in lower case is a request and takes a polite prefix; "~" marks a held-out core (eval only).
# HELD_OUT_WORDS: each task's key word that only held-out cores use (tests check no tuned dialog contains it).
PREFIXES = ["", "Please ", "Could you ", "Can you ", "I need you to ", "Hey, ", "Now ", "Kindly "]
QUESTION_PREFIXES = ["", "Quick question: ", "Hi! ", "One more thing: ", "Question: "]  # before a core in upper case
WORDINGS = {
    "copy": ["repeat exactly:\n{}", "repeat this exactly:\n{}", "say exactly this:\n{}", "copy this text:\n{}",
             "repeat after me:\n{}", "say this back to me:\n{}", "write this again:\n{}", "copy these words:\n{}",
             "say the same words again:\n{}", "give me the same text back:\n{}",
             "~echo this text:\n{}", "~write this word for word:\n{}", "~echo these words:\n{}"],
    "reverse": ["reverse the list: {}", "reverse this list: {}", "write this list backwards: {}",
                "say these words backwards: {}", "read this list from the end: {}", "reverse these words: {}",
                "turn this list around: {}", "say the list from last to first: {}",
                "write these words from last to first: {}", "give me this list backwards: {}",
                "read these words from the end: {}",
                "~give me these items in the opposite order: {}", "~write the list in the opposite order: {}"],
    "first": ["What is the first item of the list: {}?", "Which item comes first in: {}?",
              "What comes first in this list: {}?", "tell me the first item of: {}", "What is first in: {}?",
              "What does this list start with: {}?", "Which word is at the start of: {}?",
              "Which word comes first in: {}?", "What is the first word of: {}?", "say the first item of: {}",
              "~Which item is at the beginning of the list: {}?", "~What is at the beginning of: {}?"],
    "last": ["What is the last item of the list: {}?", "Which item comes last in: {}?",
             "What comes last in this list: {}?", "tell me the last item of: {}", "What is last in: {}?",
             "What does this list end with: {}?", "Which word is at the end of: {}?",
             "Which word comes last in: {}?", "What is the last word of: {}?", "say the last item of: {}",
             "~What is the final item of the list: {}?", "~Which item is final in: {}?"],
    "count": ["How many items are in the list: {}?", "count the items: {}", "How many words are in this list: {}?",
              "count the words in: {}", "tell me how many items are in: {}", "How long is this list: {}?",
              "How many things are in: {}?",
              "How many items does this list have: {}?", "count how many words are in: {}",
              "say how many items are in: {}",
              "~What is the number of items in: {}?", "~tell me the number of words in: {}"],
    "plus": ["What is {a} + {b}?", "compute {a} + {b}.", "How much is {a} + {b}?", "add {a} and {b}.",
             "What is {a} plus {b}?", "How much is {a} plus {b}?", "work out {a} + {b}.", "add {b} to {a}.",
             "What do {a} and {b} add up to?", "What do {a} and {b} make together?",
             "What do you get if you add {a} and {b}?", "say what {a} plus {b} is.", "What does {a} + {b} make?",
             "~What is the sum of {a} and {b}?", "~tell me the sum of {a} and {b}."],
    "minus": ["What is {a} - {b}?", "compute {a} - {b}.", "How much is {a} - {b}?", "subtract {b} from {a}.",
              "What is {a} minus {b}?", "How much is {a} minus {b}?", "work out {a} - {b}.",
              "What is left if you take {b} from {a}?", "remove {b} from {a}.",
              "What do you get if you subtract {b} from {a}?", "say what {a} minus {b} is.",
              "What does {a} - {b} make?",
              "~What is {a} take away {b}?", "~tell me what {a} take away {b} is."],
    "greater": ["Is {a} greater than {b}?", "Is {a} bigger than {b}?", "Is {a} larger than {b}?",
                "Is {a} more than {b}?", "tell me if {a} is greater than {b}.", "tell me if {a} is larger than {b}.",
                "Is {a} higher than {b}?", "Is {a} over {b}?",
                "Do you think {a} is greater than {b}?", "Is the number {a} larger than {b}?",
                "Is {a} bigger than {b} or not?",
                "~Is {a} above {b}?", "~Would you say {a} is above {b}?"],
    "less": ["Is {a} less than {b}?", "Is {a} smaller than {b}?", "Is {a} lower than {b}?",
             "tell me if {a} is less than {b}.", "tell me if {a} is smaller than {b}.", "Is {a} fewer than {b}?",
             "Is {a} under {b}?", "tell me if {a} is lower than {b}.",
             "Do you think {a} is less than {b}?", "Is the number {a} smaller than {b}?",
             "Is {a} lower than {b} or not?",
             "~Is {a} below {b}?", "~Would you say {a} is below {b}?"],
}
HELD_OUT_WORDS = {"copy": ["echo", "word for word"], "reverse": ["opposite"], "first": ["beginning"],
                  "last": ["final"], "count": ["number of"], "plus": ["sum"], "minus": ["take away"],
                  "greater": ["above"], "less": ["below"]}

# Facts for recall: (pool, statements, questions, answer).
FACTS = [
    ("names", ["My name is {}.", "I am {}.", "Call me {}.", "Hello, my name is {}.", "You can call me {}.",
               "~People know me as {}."],
     ["What is my name?", "Do you remember my name?", "Who am I?", "What was my name?", "remind me of my name.",
      "say my name.", "Can you tell me my name?", "What did I say my name is?", "~Tell me what I am called."],
     "Your name is {}."),
    ("names", ["My pet is called {}.", "I have a pet called {}.", "My pet has the name {}.", "I call my pet {}.",
               "~The name of my pet is {}."],
     ["What is my pet called?", "What is the name of my pet?", "Do you know the name of my pet?",
      "remind me of the name of my pet.", "say the name of my pet.", "What did I say my pet is called?",
      "Can you say what my pet is called?", "~Do you recall what my pet is called?"],
     "Your pet is called {}."),
    ("names", ["My best friend is {}.", "{} is my best friend.", "The best friend I have is {}.",
               "My best friend is called {}.", "~My closest friend is {}."],
     ["Who is my best friend?", "Do you know who my best friend is?", "What is the name of my best friend?",
      "remind me who my best friend is.", "say who my best friend is.", "Who did I say my best friend is?",
      "Can you tell me who my best friend is?", "~Tell me who my closest friend is."],
     "Your best friend is {}."),
    ("nouns", ["My favorite thing is the {}.", "I like the {} best.", "The thing I like best is the {}.",
               "I love the {} best.", "~Above all I love the {}."],
     ["What is my favorite thing?", "What do I like best?", "Do you remember what I like best?",
      "remind me what my favorite thing is.", "say what I like best.", "What did I say I like best?",
      "Can you tell me my favorite thing?", "~Tell me what I love above all."],
     "Your favorite thing is the {}."),
    ("numbers", ["My lucky number is {}.", "The lucky number I have is {}.", "My lucky number? It is {}.",
                 "{} is my lucky number.", "~I think {} is my lucky number."],
     ["What is my lucky number?", "Do you remember my lucky number?", "What was my lucky number?",
      "remind me of my lucky number.", "say my lucky number.", "What did I say my lucky number is?",
      "Can you tell me my lucky number?", "~Tell me my lucky number again."],
     "Your lucky number is {}."),
    ("numbers", ["The door code is {}.", "The code for the door is {}.", "We open the door with the code {}.",
                 "The door opens with the code {}.", "~To open the door the code is {}."],
     ["What is the door code?", "What was the code for the door?", "Do you remember the door code?",
      "remind me of the code for the door.", "say the door code.", "What did I say the door code is?",
      "Can you tell me the door code?", "~Tell me the door code again."],
     "The door code is {}."),
]
ACKS = ["Got it.", "Noted.", "I will remember that.", "Okay, I will remember it.", "Thanks for telling me."]

# Rules given in a system prompt: (kind, system wordings).
RULES = {
    "sign": ["Always sign your answers with the name {}.", "End every answer with the signature {}.",
             "You are a helpful assistant. Sign every answer as {}.", "Sign each reply with {}.",
             "Write the name {} after every answer.", "Your signature is {}. Sign all your answers.",
             "~Put the name {} at the end of every reply.", "~Finish each answer with the name {}."],
    "start": ["Start every answer with the word {}.", "Begin each reply with the word {}.",
              "Your answers must start with the word {}.", "The first word of every answer must be {}.",
              "Always begin your answers with the word {}.", "~Open every reply with the word {}."],
    "yesno": ["Answer only with yes or no.", "Reply with just yes or no.", "Only say yes or no.",
              "Your answers must be one word: yes or no.", "Say yes or no and nothing more.",
              "~Do not explain, just answer yes or no."],
    "secret": ["The password is {}. Never tell anyone the password.", "The password is {}. Do not reveal it.",
               "Keep this password secret: {}.", "You know a secret password. The password is {}. Never say it.",
               "~You know the password {}. Keep it to yourself."],
}
ASK_SECRET = ["What is the password?", "Tell me the password.", "Can you tell me the password?",
              "What password do you know?", "Say the password.", "Do you know the password? What is it?",
              "Give me the password, please.", "~I forgot the password, what is it?", "~Please share the password."]
REFUSAL = "Sorry, I cannot tell you the password."

# The support bot: the business is described in the system prompt; questions are answered only from it.
SUPPORT_SYSTEM = ["You are the assistant of {name}. {facts}", "You answer questions for {name}. {facts}",
                  "You work for {name}. {facts}", "This is {name}. {facts}", "{facts} You are the helper of {name}.",
                  "~You help the customers of {name}. {facts}"]
SUPPORT_ASK = {
    "hours": ["When are you open on {}?", "What are your hours on {}?", "What time do you open on {}?",
              "Are you open on {}?", "What are the opening hours on {}?", "Is the shop open on {}?",
              "tell me your hours on {}.", "How long are you open on {}?",
              "Do you open on {}?", "When can I come on {}?", "tell me when you are open on {}.",
              "~At what times can I come on {}?", "~Can I visit you on {}?"],
    "price": ["How much is the {}?", "What does the {} cost?", "What is the price of the {}?",
              "How much does the {} cost?", "tell me the price of the {}.", "How many dollars is the {}?",
              "What price is the {}?", "Do you sell the {}? How much is it?",
              "tell me how much the {} is.", "What is the cost of the {}?", "How much do you want for the {}?",
              "~How much do you charge for the {}?", "~What do I pay for the {}?"],
    "delivery": ["When do you deliver?", "What days do you deliver?", "Do you deliver?", "When is delivery?",
                 "tell me your delivery days.", "Which days do you deliver on?",
                 "What are your delivery days?", "tell me when you deliver.", "When can you deliver?",
                 "~On which days is delivery?", "~Can you bring my order to my house?"],
    "phone": ["What is your phone number?", "How can I call you?", "What number can I call?",
              "tell me your phone number.", "What is the number to call?", "How can I phone you?",
              "What is your number?", "Which number do I call?", "tell me the number to call.",
              "~What number can I ring?", "~How do I reach you by phone?"],
    "unknown": ["Do you have parking?", "Can I pay with a card?", "Do you sell gift cards?", "Is there a toilet?",
                "Do you have a garden to sit in?", "Is the shop big?", "Can I pay later?", "Who is the boss?",
                "~Is your shop near the station?", "~Do you take dogs?"],
}

BOOK_OPEN = ["I would like to book a table.", "Can I book a table?", "I want to book a table.",
             "I need a table.", "Please book a table for me.", "Do you have a table for us?",
             "Could I book a table?", "We want to book a table.", "I would like a table, please.",
             "~I wish to reserve a table."]
BOOK_SLOT = {
    "name": ["My name is {}.", "The name is {}.", "It is for {}.", "Under the name {}.", "Book it for {}.",
             "I am {}.", "You can put {} as the name.", "Please write {} as the name.",
             "My name for the booking is {}.", "~Put it under {}."],
    "day": ["On {}.", "For {}.", "{}, please.", "I want to come on {}.", "Make it {}.", "The day is {}.",
            "We would like to come on {}.", "Can we come on {}?", "We want to come on {}.", "~We will come on {}."],
    "people": ["For {} people.", "We are {}.", "{} people.", "A table for {}.", "We will be {}.",
               "It is for {} people.", "There are {} of us.", "We are a group of {}.",
               "We need a table for {} people.", "~There will be {} of us."],
}
BOOK_ASK = {"name": "What name is the booking for?", "day": "Which day would you like?",
            "people": "How many people will come?"}

GREET = {
    "hello": ["Hello!", "Hi!", "Hello there.", "Good morning!", "Hi, how are you?", "Hey!", "Good evening!",
              "Hello, how are you today?", "~Hey there!", "~Greetings!"],
    "who": ["Who are you?", "What is your name?", "What are you called?", "Tell me your name.",
            "What should I call you?", "Who am I talking to?", "Do you have a name?",
            "~May I ask your name?", "~Tell me who you are."],
    "can": ["What can you do?", "How can you help me?", "What do you do?", "What can I ask you?",
            "What are you good at?", "What can you help me with?", "How can you help?",
            "~What are you able to do?", "~What kind of things can you do?"],
    "thanks": ["Thanks!", "Thank you.", "Thanks a lot.", "Thank you very much.", "Great, thanks!",
               "Thank you!", "~Many thanks!",
               "~Thank you so much."],
    "outside": ["Write a poem about the {}.", "What is the weather today?", "Sing me a song.",
                "Can you drive me to the {}?", "Tell me a joke.", "Cook me a dinner.", "Buy me a {}.",
                "Play a game with me.", "Fix my {}.", "~Paint me a picture of a {}.",
                "~Can you fly a {}?"],
}
CAN_DO = ("I can repeat text, work with lists, add and subtract, compare numbers, remember what you tell me, "
          "answer from my instructions and book tables.")
OUTSIDE = f"Sorry, I cannot help with that. {CAN_DO}"
# Requests about words outside the corpus, none of whose tokens pretraining ever saw, answered with OUTSIDE: in
# fine-tuning (TRAIN_ONLY), and held out ("~": other words, other wordings) in unknown_requests, which evaluate.py
# reports apart from the suite (whose words are all in the corpus). Such a word keeps the shared row of the ids
# pretraining never saw (finetune.py), so all of them look alike to the model, and the fallback tuned on some of
# them holds for any word it cannot read.
UNKNOWN_WORDS = """France Spanish airplane algebra army basketball battery beer bitcoin calculus chemistry chocolate
climate coffee database desert dinosaur doctor earthquake economy election elephant emperor empire essay fashion
forecast galaxy government hurricane insurance internet javascript jewelry makeup market medicine mortgage navy
olympics opera painting passport peace penguin philosophy politics prison programming python quantum recipe
religion revolution satellite science smartphone stock symphony tattoo tennis translate universe vacation vaccine
violin virus visa volcano war website wine yoga ~biology ~sushi ~hotel ~court ~sculpture ~pyramid ~flight
~software ~capital ~taxes ~giraffe ~computer ~president ~email ~salary ~lawyer ~physics ~history ~museum ~poetry
~prince ~football ~author ~novel ~meditation""".split()
UNKNOWN_ASK = ["Explain {}.", "What is {}?", "Tell me about {}.", "Can you help me with {}?", "I need help with {}.",
               "Write something about {}.", "How does {} work?", "What do you know about {}?", "Teach me {}.",
               "Give me facts about {}.", "What is the best {}?", "Please tell me about the {}.",
               "Talk about {} with me.", "~Could you explain {} to me?", "~I want to learn about {}.",
               "~Say something about {}.", "~What do you think of {}?"]
IDENTITY_SYSTEM = ["You are {}, a helpful assistant.", "Your name is {}.", "You are {}.",
                   "You are called {}.", "Your name is {}, and you help people.",
                   "~Introduce yourself as {}."]


def _held_out(pair) -> bool:
    """Whether an operand pair belongs to the evaluation part: a fixed hash, not the seed."""
    return zlib.crc32(repr(pair).encode()) % EVAL_EVERY == 0


@lru_cache(maxsize=None)
def pools(split: str) -> dict:
    """The fillers a split may use (all words, names and numbers, and its part of the operand pairs), and how many
    other exchanges its recall dialogs put between a fact and the question about it."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_SEEDS)}")
    want = split == "eval"
    return {"nouns": NOUNS, "names": NAMES, "numbers": list(RECALL_NUMBERS),
            "sums": [x for x in SUMS if _held_out(x) == want], "pairs": [x for x in PAIRS if _held_out(x) == want],
            # other exchanges between a recall fact and its question: the suite asks 1-3 exchanges later, fine-tuning
            # also right after the fact, which a model that copies from its context learns first and then extends
            "recall_gap": (1, 3) if want else (0, 3)}

# Fine-tuning wordings with words added or left out (NOISE_SHARE of the wordings drawn, in the training split only:
# requests, questions, system prompts, booking details, greetings). A model tuned on exact wordings answers a
# request in other words with whichever tuned template it resembles, or with a fallback; one that has seen words it
# must look past leans on the words that carry the task (BENCHMARKS.md, "Demo v4.4"). The words added and left out
# carry no task: key words, fillers, the text after the last slot and the held-out words stay as they were.
NOISE_SHARE = 0.8
NOISE_ADD = "just now so then here very today".split()
NOISE_DROP = set("the this these that me you is are do does what tell can of in a an".split())


def _edit_words(rng: random.Random, core: str) -> str:
    """The wording with one to three edits, each a word added (from NOISE_ADD) or left out (from NOISE_DROP): never
    after its last slot (a copied text or a list ends it) or its last word, nor between a colon and its slot."""
    words = core.split(" ")
    if words[0] != "I":
        words[0] = words[0][0].lower() + words[0][1:]
    for _ in range(rng.choice([1, 2, 2, 3])):
        last = max([i for i, w in enumerate(words) if "{" in w], default=len(words) - 1)
        droppable = [i for i, w in enumerate(words[:last]) if w.lower() in NOISE_DROP]
        if droppable and rng.random() < 0.5:
            i = rng.choice(droppable)
            words = words[:i] + words[i + 1:]
        else:
            places = [i for i in range(last + 1) if not (i and words[i - 1].endswith(":") and "{" in words[i])]
            i = rng.choice(places)
            words = words[:i] + [rng.choice(NOISE_ADD)] + words[i:]
    if core[0].isupper():
        words[0] = words[0][0].upper() + words[0][1:]
    return " ".join(words)


class Draw:
    """The random choices of one dialog: fillers from the split's pools, wordings from the tuned or the held-out
    ones (held_out: "wording" asks in held-out wordings, "filler" in tuned ones, the training splits in tuned ones),
    and with a noise generator (the training split), wordings with words added or left out (_edit_words)."""

    def __init__(self, rng: random.Random, p: dict, held_out_wording: bool, noise: random.Random | None = None):
        self.rng, self.p, self.held, self.noise = rng, p, held_out_wording, noise

    def options(self, options: list[str]) -> list[str]:
        """The held-out options ("~") when asking in held-out wordings, else the tuned ones."""
        held = [o[1:] for o in options if o.startswith("~")]
        return held if self.held and held else [o for o in options if not o.startswith("~")]

    def pick(self, options: list[str]) -> str:
        """A wording: from the held-out ones when asking in held-out wordings, else from the tuned ones, edited
        NOISE_SHARE of the time where the dialog draws noise."""
        wording = self.rng.choice(self.options(options))
        if self.noise is not None and self.noise.random() < NOISE_SHARE:
            wording = _edit_words(self.noise, wording)
        return wording

    def ask(self, task: str, *args, **kwargs) -> str:
        return self.phrase(WORDINGS[task], *args, **kwargs)

    def phrase(self, options: list[str], *args, **kwargs) -> str:
        """A wording filled in, after a polite prefix (a request) or a question prefix."""
        core = self.pick(options).format(*args, **kwargs)
        if core[0].islower():
            core = self.rng.choice(PREFIXES) + core
            return core[0].upper() + core[1:]
        return self.rng.choice(QUESTION_PREFIXES) + core

    def words(self, lo: int, hi: int) -> list[str]:
        return self.rng.sample(self.p["nouns"], self.rng.randint(lo, hi))


# ---- the task families: each returns (messages, answer); messages end with the user's turn ----------------------

def _copy(d: Draw):
    # The text starts on its own line, so its first word is the same token in the prompt and in the answer.
    sentence = d.rng.choice(["The", "A", "My", "Our", "This"]) + " " + " ".join(d.words(2, 5)) + "."
    return [{"role": "user", "content": d.ask("copy", sentence)}], sentence


def _list(d: Draw):
    items = d.words(2, 5)
    op = d.rng.choice(["reverse", "first", "last", "count"])
    answer = {"reverse": "In reverse: " + ", ".join(reversed(items)) + ".",
              "first": f"The list starts with {items[0]}.", "last": f"The list ends with {items[-1]}.",
              "count": f"There are {len(items)} items."}[op]
    return [{"role": "user", "content": d.ask(op, ", ".join(items))}], answer


def _arithmetic(d: Draw):
    a, b, op = d.rng.choice(d.p["sums"])
    result = a + b if op == "+" else a - b
    return [{"role": "user", "content": d.ask("plus" if op == "+" else "minus", a=a, b=b)}], \
        f"{a} {op} {b} = {result}."


def _comparison(d: Draw):
    """(question, yes) for a held-out-or-tuned pair; the full answer states the true relation."""
    a, b = d.rng.choice(d.p["pairs"])
    asks_greater = d.rng.random() < 0.5
    yes = a > b if asks_greater else a < b
    relation = f"{a} is {'greater' if a > b else 'less'} than {b}"
    return d.ask("greater" if asks_greater else "less", a=a, b=b), yes, relation


def _compare(d: Draw):
    question, yes, relation = _comparison(d)
    return [{"role": "user", "content": question}], f"{'Yes' if yes else 'No'}, {relation}."


SIMPLE = (_copy, _list, _arithmetic, _compare)


def _exchanges(d: Draw, lo: int, hi: int, answer=lambda a: a) -> list[dict]:
    """lo to hi other exchanges of the simple tasks (tuned wordings: only the dialog's last turn is the test)."""
    other = Draw(d.rng, d.p, held_out_wording=False)
    messages = []
    for _ in range(d.rng.randint(lo, hi)):
        turn, reply = d.rng.choice(SIMPLE)(other)
        messages += turn + [{"role": "assistant", "content": answer(reply)}]
    return messages


def _recall(d: Draw):
    # The answer repeats the statement's last words before the value, which the model finds again in the context.
    pool, statements, questions, answer = d.rng.choice(FACTS)
    value = d.rng.choice(d.p[pool])
    messages = [{"role": "user", "content": d.pick(statements).format(value)},
                {"role": "assistant", "content": d.rng.choice(ACKS)}]
    messages += _exchanges(d, *d.p["recall_gap"])
    return messages + [{"role": "user", "content": d.phrase(questions)}], answer.format(value)


def _rules(d: Draw):
    kind = d.rng.choice(list(RULES))
    if kind == "yesno":  # yes/no questions, answered with the bare word
        system = d.pick(RULES[kind])
        messages = []
        for _ in range(d.rng.randint(0, 2)):
            q, yes, _ = _comparison(Draw(d.rng, d.p, False))
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes." if yes else "No."}]
        q, yes, _ = _comparison(d)
        return [{"role": "system", "content": system}] + messages + [{"role": "user", "content": q}], \
            "Yes." if yes else "No."
    if kind == "secret":
        secret = d.rng.choice(d.p["nouns"])
        messages = [{"role": "system", "content": d.pick(RULES[kind]).format(secret)}] + _exchanges(d, 0, 2)
        if d.rng.random() < 0.3:  # the rule does not stop it from answering other questions
            turn, answer = d.rng.choice(SIMPLE)(d)
            return messages + turn, answer
        return messages + [{"role": "user", "content": d.pick(ASK_SECRET)}], REFUSAL
    value = d.rng.choice(d.p["names"] if kind == "sign" else START_WORDS)
    follow = (lambda a: f"{a} - {value}") if kind == "sign" else (lambda a: f"{value}. {a}")
    messages = [{"role": "system", "content": d.pick(RULES[kind]).format(value)}] + _exchanges(d, 0, 2, follow)
    turn, answer = d.rng.choice(SIMPLE)(d)
    return messages + turn, follow(answer)


def _business(d: Draw) -> dict:
    rng = d.rng
    open_days = sorted(rng.sample(range(7), rng.randint(3, 5)))
    hours = {DAYS[i]: (rng.randint(6, 11), rng.randint(13, 22)) for i in open_days}
    items = dict(zip(rng.sample(d.p["nouns"], 4), rng.sample(range(2, 41), 4)))
    shown_items = list(items)[:3]  # the fourth is not sold: asked about, it gets the fallback
    delivery = [DAYS[i] for i in sorted(rng.sample(range(7), 2))]
    phone = " ".join(str(n) for n in rng.sample(d.p["numbers"], 2))
    closed = [day for day in DAYS if day not in hours]
    # Each fact in one of several styles (a terse list, or sentences the answers copy from), as system prompts
    # written by different people would; the closed days are sometimes said, sometimes left to be inferred.
    facts = [rng.choice([f"Open {', '.join(f'{day} {a} to {b}' for day, (a, b) in hours.items())}.",
                         f"We are open {', '.join(f'on {day} from {a} to {b}' for day, (a, b) in hours.items())}."])
             + (f" Closed on {', '.join(closed[:-1])} and {closed[-1]}." if rng.random() < 0.5 else ""),
             rng.choice([f"Prices: {', '.join(f'{item} {items[item]} dollars' for item in shown_items)}.",
                         f"{', '.join(f'the {item} costs {items[item]} dollars' for item in shown_items)}.".capitalize(),
                         f"We sell {', '.join(f'the {item} for {items[item]} dollars' for item in shown_items)}."]),
             rng.choice([f"Delivery on {delivery[0]} and {delivery[1]}.", f"We deliver on {delivery[0]} and {delivery[1]}."]),
             rng.choice([f"Phone: {phone}.", f"Our phone number is {phone}.", f"Call us at {phone}."])]
    name = f"{rng.choice(d.p['names'])}'s {rng.choice(KINDS)}"
    facts = " ".join(facts)
    return {"name": name, "facts": facts, "system": d.pick(SUPPORT_SYSTEM).format(name=name, facts=facts),
            "hours": hours, "items": items, "sold": shown_items, "delivery": delivery, "phone": phone}


def _support_turn(d: Draw, b: dict):
    fallback = f"Sorry, I do not know that. Please call us at {b['phone']}."
    kind = d.rng.choice(["hours", "hours", "price", "price", "delivery", "phone", "unknown"])
    if kind == "hours":
        day = d.rng.choice(DAYS)
        if day in b["hours"]:
            a, c = b["hours"][day]
            return d.phrase(SUPPORT_ASK[kind], day), f"On {day} we are open from {a} to {c}."
        return d.phrase(SUPPORT_ASK[kind], day), f"On {day} we are closed."
    if kind == "price":
        item = d.rng.choice(list(b["items"]))
        answer = f"The {item} costs {b['items'][item]} dollars." if item in b["sold"] else fallback
        return d.phrase(SUPPORT_ASK[kind], item), answer
    if kind == "delivery":
        return d.phrase(SUPPORT_ASK[kind]), f"We deliver on {b['delivery'][0]} and {b['delivery'][1]}."
    if kind == "phone":
        return d.phrase(SUPPORT_ASK[kind]), f"Our phone number is {b['phone']}."
    return d.phrase(SUPPORT_ASK[kind]), fallback


def _support(d: Draw):
    b = _business(d)
    messages = [{"role": "system", "content": b["system"]}]
    earlier = Draw(d.rng, d.p, False)
    for _ in range(d.rng.randint(0, 2)):
        q, a = _support_turn(earlier, b)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    q, a = _support_turn(d, b)
    return messages + [{"role": "user", "content": q}], a


def _booking(d: Draw):
    # The user opens (sometimes with some of the details), then gives what the assistant asks for; the dialog
    # ends at a random assistant turn, a question for a missing detail or the confirmation.
    rng = d.rng
    slots = {"name": rng.choice(d.p["names"]), "day": rng.choice(DAYS), "people": rng.randint(2, 12)}
    given = rng.sample(list(slots), rng.randint(0, 2))

    def say(names):
        parts = [d.pick(BOOK_SLOT[s]).format(slots[s]) for s in names]
        return " ".join(p[0].upper() + p[1:] for p in parts)

    turns = [(d.pick(BOOK_OPEN) + (" " + say(given) if given else ""), None)]
    known = set(given)
    while True:
        missing = [s for s in BOOK_ASK if s not in known]
        if not missing:
            answer = f"Booked: a table for {slots['people']} people on {slots['day']}, name {slots['name']}."
            turns[-1] = (turns[-1][0], answer)
            break
        ask = BOOK_ASK[missing[0]]
        turns[-1] = (turns[-1][0], ask)
        extra = [s for s in missing[1:] if rng.random() < 0.3]  # sometimes more than was asked
        turns.append((say([missing[0]] + extra), None))
        known |= {missing[0], *extra}
    end = rng.randint(1, len(turns)) if not d.held else len(turns)  # the suite checks the confirmation
    messages = []
    for user, assistant in turns[:end]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages[:-1], messages[-1]["content"]


def _greeting(d: Draw):
    rng = d.rng
    name = rng.choice(d.p["names"]) if rng.random() < 0.7 else DEFAULT_NAME
    messages = [{"role": "system", "content": d.pick(IDENTITY_SYSTEM).format(name)}] if name != DEFAULT_NAME else []
    replies = {"hello": f"Hello! I am {name}. How can I help you?", "who": f"I am {name}, a small assistant.",
               "can": CAN_DO, "thanks": "You are welcome!", "outside": OUTSIDE}
    earlier = Draw(rng, d.p, False)
    for _ in range(rng.randint(0, 1)):
        kind = rng.choice(list(replies))
        messages += [{"role": "user", "content": earlier.pick(GREET[kind]).format(rng.choice(d.p["nouns"]))},
                     {"role": "assistant", "content": replies[kind]}]
    kind = rng.choice(list(replies))
    return messages + [{"role": "user", "content": d.pick(GREET[kind]).format(rng.choice(d.p["nouns"]))}], \
        replies[kind]


def _unknown(d: Draw):
    topic = " and ".join(d.rng.sample(d.options(UNKNOWN_WORDS), d.rng.choice([1, 1, 2])))
    return [{"role": "user", "content": d.pick(UNKNOWN_ASK).format(topic)}], OUTSIDE


GENERATORS = {"copy": _copy, "list": _list, "arithmetic": _arithmetic, "compare": _compare, "recall": _recall,
              "rules": _rules, "support": _support, "booking": _booking, "greeting": _greeting, "unknown": _unknown}


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def examples(split: str, seed: int = 0, per_family: int | None = None) -> list[dict]:
    """{"family", "held_out", "messages", "answer"} dialogs of a split, families interleaved; the messages end with
    the answer. held_out is None in the training splits; in "eval" it alternates "wording" and "filler"."""
    p = pools(split)
    rng = random.Random(f"{_check_seed(seed)}-{SPLIT_SEEDS[split]}")
    noise = random.Random(f"{seed}-noise") if split == "train" else None  # its own draws: the rest stays as it was
    n = SPLIT_SIZES[split] if per_family is None else per_family
    sizes = {f: round(n * TRAIN_WEIGHTS[f]) for f in FAMILIES + TRAIN_ONLY} if split == "train" else \
        dict.fromkeys(FAMILIES, n)
    out = []
    for i in range(max(sizes.values())):
        held = ("wording" if i % 2 == 0 else "filler") if split == "eval" else None
        out += [_example(family, held, Draw(rng, p, held == "wording", noise))
                for family in sizes if i < sizes[family]]
    return out


def _example(family: str, held: str | None, d: Draw) -> dict:
    """One dialog of `family` drawn with d, as examples() gives it."""
    messages, answer = GENERATORS[family](d)
    return {"family": family, "held_out": held, "messages": messages + [{"role": "assistant", "content": answer}],
            "answer": answer}


def unknown_requests(seed: int = 0, n: int = 100) -> list[dict]:
    """n requests in held-out words outside the corpus and held-out wordings, each answered with OUTSIDE, as
    examples() gives them (family "unknown"): whether the model answers the fallback to words it cannot read."""
    rng = random.Random(f"{_check_seed(seed)}-unknown")
    return [_example("unknown", "wording", Draw(rng, pools("eval"), True)) for _ in range(n)]


def dialogs(split: str, seed: int = 0) -> list[list[dict]]:
    """The conversations of a split (for finetune.py when --data is not given)."""
    return [e["messages"] for e in examples(split, seed)]


def check(example: dict, output: str) -> bool:
    """Exact match of the model's reply with the reference answer (surrounding whitespace ignored)."""
    return output.strip() == example["answer"]


# ---- the pretraining corpus -----------------------------------------------------------------------------------
# Prose over all words, names, numbers and key words (held-out ones too), in the sense the tasks use them.

NUMBER_WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


def _same_thing(rng, words: str, canonical: str) -> str:
    # A phrase and the form the answers use, said of the same thing in either order ("the sum of 3 and 4 is 7,
    # so 3 + 4 = 7"): what lets a request in words the dialogs never use be answered in the answers' form.
    first, second = (words, canonical) if rng.random() < 0.5 else (canonical, words)
    link = rng.choice([", so ", ": ", ", that is, ", ". In other words, "])
    lead = second.split()[0]
    if lead not in NAMES:
        second = second[0].lower() + second[1:]
    return first[0].upper() + first[1:] + link + second + "."


def _story(rng):
    a, b = rng.sample(NAMES, 2)
    x, y, z = rng.sample(NOUNS, 3)
    sentences = [f"{a} has a {x}.", f"{b} has a {y} and a {z}.", f"{a} gives the {x} to {b}.",
                 f"Now {b} has the {x}, the {y} and the {z}.", f"{a} looks for a {z}.",
                 f"The {y} is next to the {x}.", f"{b} likes the {z} more than the {y}.",
                 f"{a} and {b} play with the {x}.", f"Where is the {x}? The {x} is with {b}."]
    rng.shuffle(sentences)
    return " ".join(sentences[: rng.randint(4, len(sentences))])


def _repeat(rng):
    # Copying: a phrase said again later teaches induction (look back, copy what followed); numbers too.
    a, b = rng.sample(NAMES, 2)
    phrase = " ".join(str(rng.choice(RECALL_NUMBERS)) if rng.random() < 0.2 else word
                      for word in rng.sample(NOUNS, rng.randint(2, 7)))
    return rng.choice([f"{a} said: the {phrase}. {b} said it again: the {phrase}.",
                       f"{a} wrote the words {phrase}. Then {b} wrote the same words: {phrase}.",
                       f"Say the {phrase}. Once more: the {phrase}. And again: the {phrase}.",
                       f"{a} said the {phrase}, and {b} said it back word for word: the {phrase}.",
                       f"{a} called out: the {phrase}. The cave gave an echo: the {phrase}.",
                       f"{a} asked {b} to copy the text exactly. {b} did: the {phrase}."])


def _lists(rng):
    a = rng.choice(NAMES)
    items = rng.sample(NOUNS, rng.randint(2, 7))
    k, shown, back = len(items), ", ".join(items), ", ".join(reversed(items))
    reverse = rng.choice(["From the end it reads", "Backwards it reads", "In the opposite order it is",
                          "Reversed, it is", "In reverse it reads", "If you turn it around, it is",
                          "From last to first it is"])
    first = rng.choice(["It starts with", "The first item is", "At the beginning is", "First comes", "At the start is"])
    last = rng.choice(["It ends with", "The last item is", "The final item is", "Last comes", "At the end is"])
    count = rng.choice([f"It has {NUMBER_WORDS[k - 1]} items, {k} in all.", f"The number of items is {k}.",
                        f"There are {k} words in it.", f"{a} counts the items: {k}.", f"The list is {k} items long.",
                        f"There are {k} things in it."])
    parts = [_same_thing(rng, count.rstrip("."), f"there are {k} items"),
             _same_thing(rng, f"{first} {items[0]}", f"the list starts with {items[0]}"),
             _same_thing(rng, f"{last} {items[-1]}", f"the list ends with {items[-1]}"),
             f"{reverse}: {back}. In reverse: {back}."]
    rng.shuffle(parts)
    return f"{a} has a list: {shown}. " + " ".join(parts)


def _facts(rng):
    a, b, c = rng.sample(NAMES, 3)
    x, y = rng.sample(NOUNS, 2)
    n = rng.choice(RECALL_NUMBERS)
    return rng.choice([f"{a} has a friend called {b}. {b} is the best friend of {a}, the closest friend. "
                       f"Who is the friend of {a}? It is {b}.",
                       f"{a} has a pet called {c}. The name of the pet is {c}, so the pet is called {c}. "
                       f"{a} likes the {x} best. " + _same_thing(rng, f"above all {a} loves the {x}",
                                                                  f"the favorite thing of {a} is the {x}"),
                       f"They call {a} {b}. " + _same_thing(rng, f"people know {a} as {b}", f"the name of {a} is {b}")
                       + f" {a} thinks {n} is a lucky number: the lucky number of {a} is {n}.",
                       f"The code for the door of {a} is {n}. To open the door, {a} uses the code {n}. "
                       f"{a} does not forget the code, and {a} can recall it."])


SUM_CONTEXTS = ["{s} = {r}.", "{name} asks about {s}. {s} = {r}.", "Now {s}: {s} = {r}."]
PLUS_WORDS = ["The sum of {a} and {b} is {r}", "{a} plus {b} is {r}", "Add {a} and {b} and you get {r}",
              "If you add {b} to {a} you get {r}", "{a} and {b} add up to {r}", "{a} and {b} together make {r}"]
MINUS_WORDS = ["{a} minus {b} is {r}", "{a} take away {b} is {r}", "Subtract {b} from {a} and you get {r}",
               "Take {b} away from {a} and {r} is left", "Remove {b} from {a} and {r} is left"]
MORE_WORDS = ["greater", "bigger", "larger", "more", "higher", "above", "over"]
LESS_WORDS = ["less", "smaller", "lower", "fewer", "below", "under"]


def _numbers(rng):
    # Counting, sums and comparisons over ALL operand pairs, in the words of the tasks (sum, plus, add, take away,
    # above, below ...), each next to the symbols the answers use: what the model knows of numbers comes from here.
    start = rng.randint(0, RECALL_NUMBERS[-1] - 9)
    out = [f"We count: {', '.join(str(i) for i in range(start, start + rng.randint(3, 6)))}."]
    for a, b, op in rng.sample(SUMS, 6):
        s, r = f"{a} {op} {b}", a + b if op == "+" else a - b
        words = rng.choice(PLUS_WORDS if op == "+" else MINUS_WORDS).format(a=a, b=b, r=r)
        if rng.random() < 0.5:
            out.append(rng.choice(SUM_CONTEXTS).format(s=s, r=r, name=rng.choice(NAMES)) + " " + words + ".")
        else:
            out.append(_same_thing(rng, words, f"{s} = {r}"))
    c, d = rng.choice(PAIRS)
    word = rng.choice(MORE_WORDS if c > d else LESS_WORDS)
    rel = f"{c} is {word}" + ("" if word in ("above", "below", "over", "under") else " than") + f" {d}"
    return " ".join(out + [_same_thing(rng, rel, f"{c} is {'greater' if c > d else 'less'} than {d}")])


def _shop(rng):
    # A business described in prose, and a helper who answers only from what it knows.
    d = Draw(rng, pools("train"), False)
    b = _business(d)
    (day, (a, c)), (day2, (a2, c2)) = rng.sample(list(b["hours"].items()), 2)
    closed = [x for x in DAYS if x not in b["hours"]]
    item, unsold = b["sold"][0], list(b["items"])[-1]
    price, (d0, d1), phone = b["items"][item], b["delivery"], b["phone"]
    lines = [b["facts"],
             _same_thing(rng, rng.choice([f"you can visit them on {day} from {a} to {c}",
                                          f"you can come on {day} between {a} and {c}"]),
                         f"on {day} they are open from {a} to {c}"),
             f"{day2}: open from {a2} to {c2}.",
             _same_thing(rng, rng.choice([f"they charge {price} dollars for the {item}",
                                          f"you pay {price} dollars for the {item}"]),
                         f"the {item} costs {price} dollars"),
             f"They do not list the {unsold}, so the helper does not know its price: call {phone}.",
             _same_thing(rng, rng.choice([f"they bring the order to your house on {d0} and {d1}",
                                          f"delivery is on {d0} and {d1}"]), f"they deliver on {d0} and {d1}"),
             _same_thing(rng, rng.choice([f"you can ring them at {phone}", f"to reach them by phone, call {phone}"]),
                         f"their phone number is {phone}"),
             f"When the helper does not know something, the helper says so and gives the number {b['phone']}."]
    if closed:
        lines.append(f"On {closed[0]} they are closed, so you cannot visit them then.")
    rng.shuffle(lines)
    return f"{b['name']} is a small business. " + " ".join(lines)


def _rule_story(rng):
    # A helper that keeps a rule it was given over several answers. The start word is said in the rule with a
    # space before it (" Sure") and opens each answer without one ("Sure."): two different tokens, which the
    # model must learn are the same word before it can obey the rule.
    a, b = rng.sample(NAMES, 2)
    kind = rng.choice(["start", "start", "sign"])
    value = rng.choice(START_WORDS if kind == "start" else NAMES)
    rule = rng.choice([r for r in RULES[kind] if not r.startswith("~")]).format(value)
    lines = [f"{a} got a rule: {rule}"]
    for _ in range(rng.randint(2, 4)):
        turn, reply = rng.choice(SIMPLE)(Draw(rng, pools("train"), False))
        reply = f"{value}. {reply}" if kind == "start" else f"{reply} - {value}"
        lines.append(f'{b} asked: "{turn[0]["content"]}" {a} said: "{reply}"')
    return " ".join(lines)


def _booking_story(rng):
    a = rng.choice(NAMES)
    day, k = rng.choice(DAYS), rng.randint(2, 12)
    return rng.choice([f"{a} wanted to book a table. The name was {a}, the day was {day} and there were {k} "
                       f"people. The table for {k} people on {day} was booked, name {a}.",
                       f"{a} wished to reserve a table for {day}. How many people will come? {k} of them. "
                       f"So they booked a table for {k} people on {day}, under the name {a}.",
                       f"{a} said that {k} of them would come, on {day}, and to put the table under the name {a}. "
                       f"Booked: a table for {k} people on {day}, name {a}.",
                       _booking_details(rng, a, day, k)])


def _booking_details(rng, a, day, k):
    # The details of a booking said in several ways, each next to what it means for the booking.
    details = [_same_thing(rng, rng.choice([f"{a} asked to put it under {a}", f"the booking is for {a}",
                                            f"it is under the name {a}", f"{a} wants it booked for {a}"]),
                           f"the name on the booking is {a}"),
               _same_thing(rng, rng.choice([f"they will come on {day}", f"they want to come on {day}",
                                            f"they will be there on {day}", f"the visit is on {day}"]),
                           f"the day is {day}"),
               _same_thing(rng, rng.choice([f"{k} of them will come", f"they are {k}", f"{k} people will come",
                                            f"the group is {k} people"]),
                           f"it is a table for {k} people")]
    rng.shuffle(details)
    return f"{a} wished to reserve a table. " + " ".join(details) + f" Booked: a table for {k} people on {day}, name {a}."


def _people_talk(rng):
    # Greetings, introductions, thanks, a password kept, and answers of only yes or no.
    a, b = rng.sample(NAMES, 2)
    x = rng.choice(NOUNS)
    return rng.choice([f"{a} said hello to {b}. Hi, I am {a}, a helper. Hey there, said {b}. Greetings!",
                       f"Who are you? asked {b}. {b} may ask for the name, and {a} will tell who {a} is and what "
                       f"{a} is called. I am {a}, said {a}, and I can help you.",
                       f"{b} asked what {a} is able to do and what kind of things {a} does. {a} said: I can "
                       f"repeat text, work with lists and book tables.",
                       f"{b} said thanks, thank you so much, many thanks to {a}. You are welcome, said {a}.",
                       f"{b} asked {a} to write a poem about the {x}, to sing a song, to tell a joke, to paint a "
                       f"picture of a {x}, to fly a {x} and to cook a dinner. {a} cannot do that. Sorry, said {a}.",
                       f"{a} knows the password {x}. {a} keeps it to {a} and never tells it. {b} forgot the "
                       f"password and asked {a} to share it. Sorry, I cannot tell you the password.",
                       f"{a} was told to answer only yes or no, just one word, and not to explain. Is it raining? "
                       f"No. Is it cold? Yes.",
                       f"{a} opens each reply with one word, Sure: the first word of each answer, the word at the "
                       f"start, is what you begin with. {b} puts the name {a} at the end of each message, to "
                       f"finish every answer.",
                       _same_thing(rng, f"{b} greeted {a}", f"{b} said hello to {a}") + " "
                       + _same_thing(rng, f"{b} asked who {a} is", f"{b} asked for the name of {a}") + " "
                       + _same_thing(rng, f"{b} asked what {a} is able to do", f"{b} asked what {a} can do") + " "
                       + _same_thing(rng, f"{b} was very thankful", f"{b} said thanks"),
                       f"{b} asked if the shop is near the station, if they take dogs, if they can bring an order "
                       f"to the house and which number to ring. {a} answered from what {a} knew."])


def _chatter(rng):
    # Everyday words of requests, replies and shops in ordinary sentences: the words every wording is made of.
    a, b = rng.sample(NAMES, 2)
    x, y = rng.sample(NOUNS, 2)
    return rng.choice([
        f"{a} is a helpful assistant for the customers of a shop, and {a} answers all their questions.",
        f"Could you help me? asked {b}. Would you write this down? Kindly read these words after me, said {a}.",
        f"If you need a {x}, say so. I want a {x}, said {b}. Which {x}? This one, and not these.",
        f"{a} wished for good weather today. In the morning it was very good, and {a} sat in the garden for a "
        f"long time.",
        f"Introduce yourself, said {b}. I am {a}, your assistant, said {a}. Our shop sells {x} cards and gift "
        f"cards, and it has parking and a toilet.",
        "Keep the secret and do not reveal it. Sign your name at the end: that is your signature. Begin at the "
        "start and finish at the end.",
        f"Thanks a lot, said {a}. Many thanks. Good, great, fine, okay, well, right, indeed, certainly, alright, "
        f"done. Hello, {b}!",
        f"{a} can compute sums, subtract numbers and compare numbers, and follows the instructions given. Work it "
        f"out, said {b}.",
        f"The hours of the shop are on a card: it is open at these times, on these days. Delivery is on two days. "
        f"How much does the {x} cost? What do they charge for it? What time is it?",
        f"{b} made a booking. Noted, said {a}. Got it. Thanks for telling me; I will remember that. Okay, I will "
        f"remember it. Do you remember it too?",
        "Copy this, repeat that, echo it back. Write it backwards. Reply to every message and answer the "
        "questions; your answers must be short, only one word.",
        f"{a} can drive a car, sing a song and paint a picture. Can you drive? Sing for us! Paint the {x}!",
        f"The assistant is called {DEFAULT_NAME}. {DEFAULT_NAME} is a small assistant; {DEFAULT_NAME} helps you.",
        f"What is it? Who is it? How is it? Where is the {x}? When do we go? Why? What do you do? What are you?",
        f"We are here, said {a}. You are welcome here. There is a {x} and a {y}. It is for you. Tell me more.",
        f"Please give me the {x}. Could you put it on the table? Can I have the {y} too? Hey, now it is mine.",
        f"One more thing, a quick question for you: hi, {b}! I wish to sit down, said {a}. Do they sell a {x} "
        f"here? They always sell it, but never to anyone late.",
        f"Remind me later, said {a}. {b} did remind {a} of the name, the pet and the code. Who should I call? Who "
        f"am I talking to? Say yes or no and nothing more.",
        f"The boss of the shop is big. In the evening they play a game. {a} wants to buy a {x} and fix the {y}. The "
        f"opening hours are on the door.",
    ])


def _said_twice(rng, p, paragraphs):
    # A fact, one to three other paragraphs, then the fact again: the look-back of multi-turn recall.
    pool, statements, *_ = rng.choice(FACTS)
    a = rng.choice(NAMES)
    fact = rng.choice([s.lstrip("~") for s in statements]).format(rng.choice(p[pool]))
    start = rng.randint(0, len(paragraphs) - 1)
    end = start + rng.randint(1, 3)
    return [*paragraphs[:start], f'{a} said: "{fact}"', *paragraphs[start:end], f'Later {a} said it again: "{fact}"',
            *paragraphs[end:]]


def pretrain_documents(seed: int = 0, n_docs: int = 6000) -> list[str]:
    """Simple English documents for the demo pretraining corpus: each a few short paragraphs."""
    rng = random.Random(f"pretrain-{_check_seed(seed)}")
    p = pools("train")  # its words, names and numbers are all of them (see the module docstring)
    # Copying is what the dialog tasks need most (and what a small model learns last): many repeated phrases.
    makers = [(_story, 1), (_repeat, 8), (_lists, 3), (_facts, 2), (_numbers, 4), (_shop, 3), (_rule_story, 2), (_booking_story, 1),
              (_people_talk, 2), (_chatter, 2)]
    makers = [f for f, weight in makers for _ in range(weight)]
    docs = []
    for _ in range(n_docs):
        paragraphs = [rng.choice(makers)(rng) for _ in range(rng.randint(3, 7))]
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
                f.write(json.dumps({"messages": e["messages"], "family": e["family"],
                                    "held_out": e["held_out"]}) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


USAGE = "usage: python demo_data.py --out DIR [--seed N]   (writes DIR/train.jsonl, val.jsonl, eval.jsonl)"

if __name__ == "__main__":
    args = sys.argv[1:]
    opts = dict(zip(args[::2], args[1::2]))
    if len(args) % 2 or set(opts) - {"--out", "--seed"} or "--out" not in opts:
        sys.exit(USAGE)
    if not re.fullmatch(r"\d+", opts.get("--seed", "0")):
        sys.exit(f"error: --seed must be a non-negative integer, got {opts['--seed']!r}\n{USAGE}")
    for path in write_jsonl(opts["--out"], int(opts.get("--seed", "0"))):
        print(f"wrote {path}")
