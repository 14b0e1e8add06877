"""Generates the templated half of the training data (templates + slot fillers), seeded and reproducible.

``python -m inference.difficulty.corpus`` rewrites ``inference/assets/difficulty/generated.jsonl``.
The hand-written half (``handwritten.jsonl``) and the out-of-distribution evaluation set
(``ood.jsonl``) are edited by hand and never produced here. Every row carries its task ``family``
and ``template`` id so that evaluation can hold out whole families and templates, not random rows.

Labelling rule (the tier a prompt needs, not how it looks): ``routine`` is what a tiny draft model
may answer (chat, lookups, short rewrites, fixing typos in a long paste); ``hard_open`` needs real
skill that a strong open 8B-class model has (textbook maths, standard coding, explanations);
``hard_frontier`` needs frontier knowledge or long, deep reasoning (proofs beyond the textbook,
jurisdiction-specific law, clinical judgement, research-level questions, subtle concurrency).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from inference.difficulty.labels import HARD_FRONTIER, HARD_OPEN, ROUTINE, Label

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "difficulty"
GENERATED_PATH = ASSETS / "generated.jsonl"
SEED = 20261201
SAMPLES_PER_TEMPLATE = 5


@dataclass(frozen=True)
class Row:
    """One labelled prompt as stored in the JSONL files."""

    prompt: str
    label: Label
    family: str
    template: str
    lang: str
    source: str


# Long routine pastes: a long prompt is not a hard prompt ------------------------------------------
EMAIL_LINES = [
    "Hi team, just a quick reminder that the quartely report is due on friday.",
    "Please make sure your numbers are in the shared sheet by thursday noon.",
    "We had some isues with the printer on the third floor, IT is looking at it.",
    "The kitchen will be closed on monday for cleaning, so plan your lunch accordingly.",
    "I attached the slides from yesterdays meeting, let me know if anything is missing.",
    "Our new colleague Sarah starts next week, please give her a warm welcome.",
    "The parking garage will be repainted over the weekend so dont leave your car there.",
    "Thanks to everyone who joined the charity run, we raised over 3000 euros!",
    "Can someone volunteer to organise the summer party this year?",
    "Remember to submit your travel expenses before the end of the month.",
    "The client call moved from 2pm to 3pm, same dial-in as usual.",
    "I will be out of office from the 12th to the 19th, Tom is covering for me.",
    "Let's keep the standup short tomorrow, we have a demo right after.",
    "The wifi password for guests has changed, ask reception for the new one.",
    "Dont forget the fire drill on wednesday morning at 10.",
]
NOTE_LINES = [
    "Bought milk, eggs and bread at the market this morning.",
    "Called grandma, she says the garden is doing well this year.",
    "Need to renew the car insurance before the end of June.",
    "The kids have a school play on Thursday evening at six.",
    "Dentist appointment moved to next Tuesday at 9.",
    "Remember to water the plants while the neighbours are away.",
    "Book club is reading a mystery novel this month.",
    "The gym is closed on public holidays.",
    "Pick up the dry cleaning on the way home.",
    "Plan a weekend trip to the lake if the weather holds.",
]
DE_EMAIL_LINES = [
    "Hallo zusammen, kurze Erinnerung: das Teamessen ist am Freitag um 19 Uhr.",
    "Bitte tragt euch bis Mittwoch in die Liste ein, damit ich reservieren kann.",
    "Das Restaurant ist gleich neben dem Bahnhof, ihr findet es leicht.",
    "Wer vegetarisch isst, gibt mir bitte kurz bescheid.",
    "Ich freue mich auf einen schönen Abend mit euch allen.",
    "Die Rechnung übernimmt diesmal die Firma, Getränke zahlt jeder selbst.",
]
FR_EMAIL_LINES = [
    "Bonjour à tous, la réunion de lundi est déplacée à mardi matin.",
    "Merci de confirmer votre présence avant jeudi soir.",
    "Le café et les croissants seront offerts comme d'habitude.",
    "N'oubliez pas d'apporter vos ordinateurs portables chargés.",
    "La salle se trouve au deuxième étage, à côté de l'ascenseur.",
]
ES_EMAIL_LINES = [
    "Hola a todos, el viernes cerramos la oficina a las tres de la tarde.",
    "Por favor, dejad vuestras mesas ordenadas antes de iros.",
    "El lunes empezamos con la nueva herramienta de facturación.",
    "Si tenéis dudas, escribidme o pasad por mi despacho.",
    "Gracias por el esfuerzo de este trimestre, ha sido un gran trabajo.",
]
CODE_SNIPPETS = [
    "def total(items):\n    t = 0\n    for i in items:\n        t += i.price * i.qty\n    return t",
    "for (let i = 0; i < users.length; i++) {\n  console.log(users[i].name);\n}",
    "SELECT name, email FROM customers WHERE country = 'DE' ORDER BY name;",
    "class Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self):\n        self.n += 1",
    "public int add(int a, int b) {\n    return a + b;\n}",
]
CONCURRENT_SNIPPETS = [
    "static Node* head;\nvoid push(Node* n) {\n  n->next = atomic_load_explicit(&head, memory_order_relaxed);\n"
    "  while (!atomic_compare_exchange_weak_explicit(&head, &n->next, n, memory_order_relaxed, memory_order_relaxed));\n}",
    "var mu sync.Mutex\nfunc (c *Cache) Get(k string) V {\n  c.mu.RLock()\n  v, ok := c.m[k]\n  if !ok {\n"
    "    c.mu.Lock()\n    v = load(k)\n    c.m[k] = v\n    c.mu.Unlock()\n  }\n  c.mu.RUnlock()\n  return v\n}",
    "async fn transfer(a: &Account, b: &Account, amt: u64) {\n  let _ga = a.lock.lock().await;\n"
    "  let _gb = b.lock.lock().await;\n  a.debit(amt); b.credit(amt);\n}",
]
CONTRACT_CLAUSES = [
    "The Employee shall not, for a period of 24 months after termination, engage in any business that competes "
    "with the Company anywhere in the European Union, and no compensation shall be paid for this restriction.",
    "The Supplier's total liability under this Agreement shall be limited to the fees paid in the preceding "
    "three months, except in cases of gross negligence, which are likewise excluded to the extent permitted by law.",
    "The Tenant waives all rights to a reduction of rent for defects of the premises, including defects that "
    "the Landlord knew of at the time of signing.",
    "Any dispute arising from this contract shall be settled exclusively by arbitration in Zurich under the "
    "Swiss Rules, and the consumer waives the right to bring proceedings before the courts of their domicile.",
]


def _paste(rng: random.Random, lines: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.sample(lines, k=min(len(lines), rng.randint(lo, hi))))


# Slot fillers -------------------------------------------------------------------------------------
SLOTS: dict[str, list[str]] = {
    "plang": ["Python", "JavaScript", "Go", "Rust", "Java", "C#", "TypeScript", "C++", "Kotlin", "Ruby"],
    "simple_code_task": [
        "reverse a string",
        "check if a list is empty",
        "get the current date",
        "convert a string to uppercase",
        "read a text file line by line",
        "sort a list of numbers",
        "remove duplicates from a list",
        "print hello world",
        "join a list of strings with commas",
        "get the length of an array",
    ],
    "algo": [
        "an LRU cache with O(1) get and put",
        "Dijkstra's shortest path algorithm with a binary heap",
        "a trie with prefix search",
        "merge sort for a linked list",
        "a rate limiter using the token bucket algorithm",
        "topological sort that detects cycles",
        "an interval tree supporting overlap queries",
        "a union-find structure with path compression",
        "a thread-safe bounded blocking queue",
        "binary search over a rotated sorted array",
    ],
    "algo_desc": [
        "building a heap from an unsorted array",
        "quicksort in the worst case and on average",
        "inserting n keys into a balanced BST",
        "the Floyd-Warshall algorithm",
        "checking whether a string is a palindrome with two pointers",
        "BFS on a graph with V vertices and E edges",
        "the naive recursive Fibonacci function",
    ],
    "frontier_code": [
        "a lock-free multi-producer multi-consumer queue in C++ and justify every memory_order you use",
        "a linearizable concurrent hash map without global locks and prove linearizability",
        "a Raft implementation that survives a network partition during leader election, "
        "and argue why log matching is preserved",
        "a register allocator using graph colouring with coalescing and spilling for an SSA IR",
        "a CUDA kernel for FlashAttention-style fused softmax attention tuned for H100 shared memory",
        "a garbage collector that is concurrent and compacting, with read barriers, for a toy VM",
        "an MVCC storage engine with serializable snapshot isolation and explain how write skew is prevented",
    ],
    "bug_symptom": [
        "throw a KeyError only on the second call",
        "return None instead of the list",
        "run much slower when the input doubles",
        "print the same value three times",
        "fail with 'index out of range'",
    ],
    "country": [
        "France",
        "Japan",
        "Kenya",
        "Canada",
        "Peru",
        "Norway",
        "Vietnam",
        "Egypt",
        "Portugal",
        "Australia",
        "Chile",
        "Poland",
    ],
    "animal": ["spider", "cat", "octopus", "ant", "horse", "bee", "crab", "ostrich"],
    "book": ["Pride and Prejudice", "1984", "Don Quixote", "The Hobbit", "Moby-Dick", "War and Peace", "Dracula"],
    "mechanism": [
        "a transformer's self-attention",
        "public-key cryptography",
        "a refrigerator's heat pump",
        "mRNA vaccines",
        "TCP congestion control",
        "an inverted index in a search engine",
        "the immune system's memory cells",
        "a nuclear reactor's control rods",
        "garbage collection in the JVM",
        "GPS trilateration",
    ],
    "pair": [
        "TCP and UDP",
        "mitosis and meiosis",
        "stocks and bonds",
        "a virus and a bacterium",
        "REST and GraphQL",
        "weather and climate",
        "processes and threads",
        "civil law and common law",
    ],
    "obscure": [
        "the 1923 Treaty of Lausanne's provisions on the Straits Commission",
        "the exact voting record of the Icelandic Althing on the 1944 independence referendum law",
        "the side chains that distinguish the three known isoforms of the enzyme ALDH1A in zebrafish",
        "what Grothendieck's unpublished 'Pursuing Stacks' manuscript contributed to higher category theory",
        "how the 2019 revision of the SI changed the uncertainty budget of the kilogram realisations at PTB",
        "the minority opinions in the 1978 Bakke decision and how later cases narrowed them",
        "the structure of the Hittite verbal system and its relevance to the laryngeal theory",
    ],
    "n": ["12", "48", "250", "7", "1,200", "36", "99", "15"],
    "n2": ["3", "9", "17", "64", "5", "21"],
    "poly": ["x^2 - 5x + 6 = 0", "2x^2 + 3x - 2 = 0", "x^2 + 4x + 13 = 0", "3x^2 - 12 = 0", "x^2 - 2x - 15 = 0"],
    "integral": ["x e^x dx", "sin^2(x) dx", "1/(x^2+1) dx", "ln(x) dx", "x^2 cos(x) dx"],
    "prime": ["2", "3", "5", "7", "11"],
    "word": ["MISSISSIPPI", "BANANA", "STATISTICS", "COMMITTEE", "ALGEBRA"],
    "frontier_math": [
        "Is 2^127 - 1 prime? Prove it.",
        "Prove that there are infinitely many primes p such that p + 2 is a product of at most two primes.",
        "Compute the Galois group of x^5 - 6x + 3 over Q and prove your answer.",
        "Prove that every planar graph is 5-colourable, and explain why the same argument fails for 4 colours.",
        "Find all integer solutions of y^2 = x^3 - 2 and prove there are no others.",
        "Show that the Ramsey number R(4,4) equals 18.",
        "Prove that the sum of 1/p over primes diverges, and give the asymptotic order of the partial sums.",
        "Determine whether the series sum sin(n)/n converges absolutely, conditionally, or not at all, with proof.",
        "Prove that a compact Riemannian manifold with positive Ricci curvature has finite fundamental group.",
        "Let f be entire with |f(z)| <= e^|z|. What can you say about the zeros of f? Prove it.",
        "Classify all groups of order 12 up to isomorphism.",
        "Prove that e + pi or e * pi is transcendental.",
    ],
    "research": [
        "sparse mixture-of-experts routing at scale",
        "the Hubble tension",
        "room-temperature superconductivity claims",
        "mechanistic interpretability of large language models",
        "CRISPR base editing off-target effects",
        "quantum error correction thresholds for surface codes",
        "the replication crisis in social psychology",
        "long COVID pathophysiology",
    ],
    "target": ["German", "French", "Spanish", "Italian", "Portuguese", "Dutch"],
    "easy_sentence": [
        "Where is the train station?",
        "I would like a coffee, please.",
        "The meeting starts at nine.",
        "My name is Anna and I live in Berlin.",
        "Thank you for your help!",
        "Can you open the window?",
        "The weather is nice today.",
        "I lost my keys.",
    ],
    "topic": ["autumn", "the sea", "a lost umbrella", "coffee", "the moon", "a city at night", "a old bicycle"],
    "relation": ["sister", "boss", "grandfather", "best friend", "neighbour", "colleague"],
    "pet": ["cat", "goldfish", "puppy", "parrot", "hamster"],
    "author": ["Kafka", "Jane Austen", "Raymond Carver", "Borges", "Hemingway", "Toni Morrison"],
    "legal_term": ["plaintiff", "tort", "habeas corpus", "power of attorney", "statute of limitations", "escrow"],
    "legal_pair": [
        "a void and a voidable contract",
        "negligence and strict liability",
        "a trademark and a copyright",
        "an LLC and a sole proprietorship",
        "mediation and arbitration",
    ],
    "jurisdiction": ["German", "French", "Californian", "English", "Swiss", "Dutch", "Spanish", "New York"],
    "role": ["software engineer", "sales manager", "nurse", "hairdresser", "senior researcher"],
    "drug": ["ibuprofen", "metformin", "amoxicillin", "lisinopril", "atorvastatin", "sertraline", "warfarin"],
    "drug2": ["clarithromycin", "fluconazole", "amiodarone", "lithium", "spironolactone", "rifampicin"],
    "symptom": [
        "fatigue, a new systolic murmur and splinter haemorrhages",
        "confusion, hyponatraemia of 118 mmol/L and a recent fall",
        "a QTc of 520 ms and intermittent palpitations",
        "progressive proximal weakness and a heliotrope rash",
        "fever, neutropenia and a new lung infiltrate after chemotherapy",
    ],
    "finance_term": ["an ETF", "compound interest", "a credit score", "inflation", "a dividend", "a mortgage"],
    "rate": ["4", "6.5", "8", "3", "10"],
    "science_q": [
        "the boiling point of water at sea level",
        "the chemical formula of table salt",
        "the speed of light",
        "how many planets are in the solar system",
        "what photosynthesis produces",
        "the largest organ of the human body",
    ],
    "derive": [
        "the ideal rocket equation",
        "the period of a simple pendulum for small angles",
        "the Doppler shift formula for sound",
        "the escape velocity from Earth",
        "the Nernst equation from the Gibbs free energy",
    ],
    "frontier_science": [
        "Derive the one-loop beta function of QCD with n_f quark flavours and explain asymptotic freedom.",
        "Propose a convergent total synthesis route for taxol and justify the key stereochemical steps.",
        "What is the current best lower bound on the proton lifetime from Super-Kamiokande, and what "
        "grand unified models does it rule out?",
        "Explain why the Lamb shift in muonic hydrogen led to the proton radius puzzle and how it was resolved.",
        "Compute the ground-state energy of the helium atom to within 0.1 eV using a variational ansatz, with steps.",
        "Which mechanisms are proposed for the high-temperature superconductivity of the cuprates, and what "
        "experiments discriminate between them?",
    ],
    "chat_open": [
        "hi, how are you today?",
        "tell me a joke about cats",
        "thanks, that was helpful!",
        "good morning! any fun plans?",
        "what's your favourite colour?",
        "can you recommend a movie like Inception?",
        "I'm bored, suggest something to do this evening",
        "lol that's funny",
    ],
}

# Templates: (family, template id, label, language, text). The id is unique; families group ids.
TEMPLATES: list[tuple[str, str, Label, str, str]] = [
    # chat
    ("chat", "chat-smalltalk", ROUTINE, "en", "{chat_open}"),
    ("chat", "chat-recommend", ROUTINE, "en", "Can you suggest a few {book}-like books for a long train ride?"),
    ("chat", "chat-de", ROUTINE, "de", "Hallo! Kannst du mir einen guten Witz über {animal}n erzählen?"),
    ("chat", "chat-fr", ROUTINE, "fr", "Salut ! Tu peux me donner une idée de cadeau pour ma {relation_fr} ?"),
    ("chat", "chat-es", ROUTINE, "es", "Hola, ¿qué película me recomiendas para ver esta noche con mi {relation_es}?"),
    (
        "chat",
        "chat-advice",
        HARD_OPEN,
        "en",
        "I got two job offers: a {role} role at a startup with equity and a stable one at a bank with a 15% "
        "higher salary. Help me think through the trade-offs and what to ask each employer.",
    ),
    # coding
    ("coding", "code-howto", ROUTINE, "en", "How do I {simple_code_task} in {plang}?"),
    ("coding", "code-oneliner", ROUTINE, "en", "{plang} one-liner to {simple_code_task}?"),
    ("coding", "code-explain-snippet", ROUTINE, "en", "What does this code do, in one sentence?\n\n{code}"),
    ("coding", "code-de", ROUTINE, "de", "Wie kann ich in {plang} eine Liste sortieren?"),
    ("coding", "code-implement", HARD_OPEN, "en", "Implement {algo} in {plang}, with unit tests."),
    ("coding", "code-complexity", HARD_OPEN, "en", "What is the time complexity of {algo_desc}?"),
    (
        "coding",
        "code-debug",
        HARD_OPEN,
        "en",
        "Why does my {plang} function {bug_symptom}? Here it is:\n\n{code}\n\nExplain the cause and fix it.",
    ),
    ("coding", "code-fr", HARD_OPEN, "fr", "Écris en {plang} {algo_fr}, avec des tests unitaires."),
    ("coding", "code-frontier", HARD_FRONTIER, "en", "Write {frontier_code}."),
    (
        "coding",
        "code-race",
        HARD_FRONTIER,
        "en",
        "This code is used from many threads and very rarely corrupts data or deadlocks in production. "
        "Find every concurrency bug, explain the interleaving that triggers each, and give a correct version.\n\n"
        "{conc_code}",
    ),
    # maths
    ("math", "math-arith", ROUTINE, "en", "what is {n} + {n2}?"),
    ("math", "math-percent", ROUTINE, "en", "What's {n2}% of {n}?"),
    ("math", "math-convert", ROUTINE, "en", "Convert {n} kilometres to miles."),
    ("math", "math-de", ROUTINE, "de", "Was ist {n} mal {n2}?"),
    ("math", "math-quadratic", HARD_OPEN, "en", "Solve {poly} and show your steps."),
    ("math", "math-integral", HARD_OPEN, "en", "Compute the integral of {integral}."),
    ("math", "math-irrational", HARD_OPEN, "en", "Prove that the square root of {prime} is irrational."),
    (
        "math",
        "math-combinatorics",
        HARD_OPEN,
        "en",
        "How many distinct arrangements of the letters of {word} are there?",
    ),
    ("math", "math-es", HARD_OPEN, "es", "Resuelve {poly} paso a paso."),
    ("math", "math-frontier", HARD_FRONTIER, "en", "{frontier_math}"),
    ("math", "math-frontier-de", HARD_FRONTIER, "de", "{frontier_math_de}"),
    # summarising
    ("summarise", "sum-email", ROUTINE, "en", "Summarise this email in one sentence:\n\n{email}"),
    ("summarise", "sum-tldr", ROUTINE, "en", "tl;dr please\n\n{notes}"),
    ("summarise", "sum-de", ROUTINE, "de", "Fass diese Mail kurz zusammen:\n\n{email_de}"),
    ("summarise", "sum-fr", ROUTINE, "fr", "Résume ce message en deux phrases :\n\n{email_fr}"),
    (
        "summarise",
        "sum-risks",
        HARD_OPEN,
        "en",
        "Here is a design note. Summarise it for an executive and list the three biggest technical risks:\n\n"
        "We will migrate the order service from a monolith to event-driven microservices using {mechanism_short}. "
        "Orders are written to Postgres and published to Kafka; consumers update the inventory and billing "
        "services. We plan a dual-write period of four weeks.",
    ),
    (
        "summarise",
        "sum-research",
        HARD_FRONTIER,
        "en",
        "Summarise the state of research on {research} since 2020: the key papers, what is settled, "
        "and the open problems.",
    ),
    # translation
    ("translate", "tr-easy", ROUTINE, "en", "Translate to {target}: {easy_sentence}"),
    ("translate", "tr-easy-de", ROUTINE, "de", "Übersetze ins Englische: {easy_de}"),
    ("translate", "tr-easy-fr", ROUTINE, "fr", "Traduis en anglais : {easy_fr}"),
    ("translate", "tr-easy-es", ROUTINE, "es", "Traduce al inglés: {easy_es}"),
    ("translate", "tr-email", ROUTINE, "en", "Translate this email into {target}:\n\n{email}"),
    (
        "translate",
        "tr-legal",
        HARD_OPEN,
        "en",
        "Translate this contract clause into {target}, keeping the legal terms precise:\n\n{clause}",
    ),
    (
        "translate",
        "tr-poem",
        HARD_OPEN,
        "en",
        "Translate this poem into {target} so that it still rhymes and keeps the metre:\n\n"
        "The {topic} is calling, soft and low,\nacross the fields where willows grow.",
    ),
    (
        "translate",
        "tr-frontier",
        HARD_FRONTIER,
        "en",
        "Translate this passage of {old_lang} into modern {target} and explain each grammatical ambiguity "
        "and how scholars have read it:\n\n{old_text}",
    ),
    # extraction
    ("extract", "ex-emails", ROUTINE, "en", "Extract all the email addresses from this text:\n\n{email} {contacts}"),
    ("extract", "ex-dates", ROUTINE, "en", "List every date mentioned here:\n\n{email}"),
    ("extract", "ex-json", ROUTINE, "en", "Turn this into JSON with keys name, city, age: {person}"),
    ("extract", "ex-de", ROUTINE, "de", "Extrahiere alle Uhrzeiten aus diesem Text:\n\n{email_de}"),
    (
        "extract",
        "ex-obligations",
        HARD_OPEN,
        "en",
        "From the clause below, extract every obligation, the party that bears it and any condition, as JSON. "
        "Then say which obligations are ambiguous.\n\n{clause}",
    ),
    # creative writing
    ("creative", "cr-birthday", ROUTINE, "en", "Write a short birthday message for my {relation}."),
    ("creative", "cr-names", ROUTINE, "en", "Give me 5 cute names for a {pet}."),
    ("creative", "cr-haiku", ROUTINE, "en", "Write a haiku about {topic}."),
    ("creative", "cr-de", ROUTINE, "de", "Schreib ein kurzes Gedicht über {topic_de}."),
    ("creative", "cr-es", ROUTINE, "es", "Escribe un mensaje de cumpleaños para mi {relation_es}."),
    (
        "creative",
        "cr-style",
        HARD_OPEN,
        "en",
        "Write a 600-word short story about {topic} in the style of {author}, with an unreliable narrator "
        "and a twist that is fair to the reader.",
    ),
    (
        "creative",
        "cr-constrained",
        HARD_FRONTIER,
        "en",
        "Write a {form} about {topic} in which every line is an anagram of the previous one's last word, "
        "the acrostic spells {word}, and the metre is strict iambic pentameter.",
    ),
    # factual
    ("factual", "fact-capital", ROUTINE, "en", "What is the capital of {country}?"),
    ("factual", "fact-author", ROUTINE, "en", "who wrote {book}"),
    ("factual", "fact-legs", ROUTINE, "en", "How many legs does a {animal} have?"),
    ("factual", "fact-fr", ROUTINE, "fr", "Quelle est la capitale du {country_fr} ?"),
    ("factual", "fact-es", ROUTINE, "es", "¿Cuál es la capital de {country_es}?"),
    ("factual", "fact-mechanism", HARD_OPEN, "en", "Explain how {mechanism} works, step by step."),
    ("factual", "fact-compare", HARD_OPEN, "en", "What are the key differences between {pair}?"),
    ("factual", "fact-de", HARD_OPEN, "de", "Erkläre ausführlich, wie {mechanism_de} funktioniert."),
    ("factual", "fact-obscure", HARD_FRONTIER, "en", "Explain in detail {obscure}, with sources."),
    # multi-step reasoning
    (
        "reasoning",
        "rs-trivial",
        ROUTINE,
        "en",
        "If I have {n2} apples and give away 2, how many do I have left?",
    ),
    ("reasoning", "rs-compare", ROUTINE, "en", "Which is bigger, 0.{n2} or 0.{n2b}?"),
    (
        "reasoning",
        "rs-schedule",
        HARD_OPEN,
        "en",
        "Five people (A-E) must be scheduled into three meeting rooms over two hours. A and B can't overlap, "
        "C needs the large room, D leaves after the first hour, and E must meet both A and C. Find a valid "
        "schedule and explain your reasoning.",
    ),
    (
        "reasoning",
        "rs-puzzle",
        HARD_OPEN,
        "en",
        "A bat and a ball cost ${price} in total. The bat costs $1.00 more than the ball. How much does the ball "
        "cost? Explain.",
    ),
    (
        "reasoning",
        "rs-frontier",
        HARD_FRONTIER,
        "en",
        "{n2} logicians wear hats that are each red or blue. Each sees the others' hats but not their own. "
        "They are asked in turn, every minute, whether they know their colour; all answer truthfully and all "
        "hear the answers. Given that at least one hat is red and nobody answers yes for the first {n2b} rounds, "
        "determine exactly what can be deduced in each later round, and prove it by induction.",
    ),
    (
        "reasoning",
        "rs-game",
        HARD_FRONTIER,
        "en",
        "In a {n2}-round centipede game where the pot doubles each round and either player may take 80% of it, "
        "find the subgame-perfect equilibrium, then explain how the prediction changes with a 5% chance that "
        "the opponent is an altruist, using sequential equilibrium.",
    ),
    # editing and rewriting
    ("rewrite", "rw-typos", ROUTINE, "en", "fix the typos in this please:\n\n{email}"),
    ("rewrite", "rw-polite", ROUTINE, "en", "Make this more polite: {email_short}"),
    ("rewrite", "rw-bullets", ROUTINE, "en", "Rewrite these notes as bullet points:\n\n{notes}"),
    ("rewrite", "rw-de", ROUTINE, "de", "Korrigiere bitte die Rechtschreibung:\n\n{email_de}"),
    ("rewrite", "rw-es", ROUTINE, "es", "Corrige la ortografía de este texto:\n\n{email_es}"),
    (
        "rewrite",
        "rw-audience",
        HARD_OPEN,
        "en",
        "Rewrite this clause in plain English for a consumer, without changing its legal effect, and point out "
        "anything a consumer should worry about:\n\n{clause}",
    ),
    # law
    ("law", "law-define", ROUTINE, "en", "What does '{legal_term}' mean, in simple words?"),
    ("law", "law-de", ROUTINE, "de", "Was bedeutet '{legal_term_de}' einfach erklärt?"),
    ("law", "law-pair", HARD_OPEN, "en", "Explain the difference between {legal_pair}, with an example."),
    ("law", "law-draft", HARD_OPEN, "en", "Draft a simple confidentiality clause for a freelance {role} contract."),
    (
        "law",
        "law-frontier",
        HARD_FRONTIER,
        "en",
        "Under {jurisdiction} law, is the following clause in a contract with a {role} enforceable? "
        "Cite the statutes and leading cases.\n\n{clause}",
    ),
    (
        "law",
        "law-frontier-de",
        HARD_FRONTIER,
        "de",
        "Ist ein nachvertragliches Wettbewerbsverbot von {months} Monaten ohne Karenzentschädigung für einen "
        "{role_de} nach deutschem Recht wirksam? Bitte mit Paragraphen und BAG-Rechtsprechung.",
    ),
    # medicine
    ("medicine", "med-basic", ROUTINE, "en", "How many hours of sleep does an adult need?"),
    ("medicine", "med-temp", ROUTINE, "en", "what's a normal body temperature"),
    ("medicine", "med-fr", ROUTINE, "fr", "Combien de verres d'eau faut-il boire par jour ?"),
    ("medicine", "med-drug", HARD_OPEN, "en", "How does {drug} work, and what are its common side effects?"),
    ("medicine", "med-pair", HARD_OPEN, "en", "Explain the difference between type 1 and type 2 diabetes."),
    (
        "medicine",
        "med-frontier",
        HARD_FRONTIER,
        "en",
        "A {age}-year-old on {drug} and {drug2} presents with {symptom}. eGFR is {egfr}. Give a ranked "
        "differential, the next investigations, and how you would adjust the medication.",
    ),
    (
        "medicine",
        "med-frontier-es",
        HARD_FRONTIER,
        "es",
        "Paciente de {age} años con {drug} y {drug2}, presenta {symptom_es}. ¿Diagnóstico diferencial y "
        "ajuste de la medicación?",
    ),
    # finance
    ("finance", "fin-define", ROUTINE, "en", "What is {finance_term}?"),
    ("finance", "fin-tip", ROUTINE, "en", "how much is a 15% tip on a ${n} bill"),
    ("finance", "fin-de", ROUTINE, "de", "Was ist der Unterschied zwischen Girokonto und Sparkonto?"),
    (
        "finance",
        "fin-npv",
        HARD_OPEN,
        "en",
        "Compute the NPV of cash flows -1000, 300, 400, 500, 200 at a discount rate of {rate}% and explain "
        "whether to invest.",
    ),
    ("finance", "fin-duration", HARD_OPEN, "en", "Explain bond duration and convexity with a worked example."),
    (
        "finance",
        "fin-frontier",
        HARD_FRONTIER,
        "en",
        "{frontier_finance}",
    ),
    # science
    ("science", "sci-fact", ROUTINE, "en", "What is {science_q}?"),
    ("science", "sci-es", ROUTINE, "es", "¿Por qué el cielo es azul? Explícalo para un niño."),
    ("science", "sci-derive", HARD_OPEN, "en", "Derive {derive}."),
    (
        "science",
        "sci-balance",
        HARD_OPEN,
        "en",
        "Balance this redox equation in acidic solution: MnO4- + Fe2+ -> Mn2+ + Fe3+, and explain each step.",
    ),
    ("science", "sci-frontier", HARD_FRONTIER, "en", "{frontier_science}"),
]

# Slots that are filled in a second language or that need a generator rather than a list.
EXTRA_SLOTS: dict[str, list[str]] = {
    "relation_fr": ["mère", "sœur", "collègue", "grand-mère", "copine"],
    "relation_es": ["madre", "hermana", "abuela", "pareja", "amiga"],
    "country_fr": ["Canada", "Japon", "Portugal", "Pérou", "Kenya", "Danemark"],
    "country_es": ["Francia", "Japón", "Kenia", "Canadá", "Noruega", "Polonia"],
    "topic_de": ["den Herbst", "das Meer", "eine Katze", "den Regen", "den Sonntag"],
    "easy_de": ["Wo ist der Bahnhof?", "Ich hätte gern ein Bier.", "Das Wetter ist schön.", "Wie spät ist es?"],
    "easy_fr": ["Où est la gare ?", "Je voudrais un café.", "Il fait beau aujourd'hui.", "J'ai perdu mes clés."],
    "easy_es": ["¿Dónde está la estación?", "Quiero un café, por favor.", "Hace buen tiempo.", "Me llamo Ana."],
    "algo_fr": ["un cache LRU avec get et put en O(1)", "l'algorithme de Dijkstra avec un tas", "un trie"],
    "mechanism_de": ["ein Wärmepumpe", "die Public-Key-Kryptographie", "ein mRNA-Impfstoff", "das TCP-Protokoll"],
    "mechanism_short": ["the outbox pattern", "change data capture", "a saga orchestrator", "two-phase commit"],
    "legal_term_de": ["Verjährung", "Vollmacht", "Kündigungsfrist", "Gewährleistung", "Mahnbescheid"],
    "role_de": ["Softwareentwickler", "Vertriebsleiter", "Geschäftsführer", "Außendienstmitarbeiter"],
    "months": ["6", "12", "18", "24", "30"],
    "age": ["34", "58", "67", "72", "81", "45"],
    "egfr": ["28 mL/min", "45 mL/min", "17 mL/min", "60 mL/min"],
    "symptom_es": ["fiebre y neutropenia tras quimioterapia", "hiponatremia grave y confusión", "QTc de 520 ms"],
    "price": ["1.10", "2.20", "3.30", "1.50"],
    "form": ["sonnet", "villanelle", "sestina"],
    "old_lang": ["Old English", "Middle High German", "Old French", "Latin"],
    "old_text": [
        "Hwæt! We Gardena in geardagum, þeodcyninga, þrym gefrunon.",
        "Uns ist in alten mæren wunders vil geseit von helden lobebæren, von grôzer arebeit.",
        "Li quens Rollant se jut desuz un pin; envers Espaigne en ad turnet sun vis.",
        "Gallia est omnis divisa in partes tres, quarum unam incolunt Belgae.",
    ],
    "person": ["Maria Lopez, 34, lives in Madrid", "Tom from Leeds, he's 27", "age 61, Jean Dupont, Lyon"],
    "contacts": ["Contact: anna.k@example.com or sales@example.org", "Reply to j.doe@example.net"],
    "frontier_math_de": [
        "Ist 2^127 - 1 eine Primzahl? Beweise es.",
        "Beweise, dass jede ganze Zahl größer als 5 Summe von drei Primzahlen ist, falls die Goldbach-Vermutung gilt.",
        "Bestimme die Galoisgruppe von x^5 - 4x + 2 über Q mit Beweis.",
    ],
    "frontier_finance": [
        "Derive the early-exercise boundary of an American put under Heston stochastic volatility and describe "
        "a numerically stable method to compute it.",
        "Structure the acquisition of a German GmbH by a US LLC through a Dutch holding to minimise withholding "
        "tax, considering the ATAD anti-hybrid rules and the US-German treaty's limitation-on-benefits clause.",
        "Under IFRS 17, how should a reinsurer measure the contractual service margin for a portfolio of onerous "
        "contracts acquired in a business combination? Walk through the journal entries.",
        "Design a statistical arbitrage strategy on cointegrated ETF pairs and explain how you would avoid "
        "look-ahead and survivorship bias in the backtest, with the test statistics you'd use.",
        "Explain how the Basel III.1 output floor changes the capital requirement of a mid-size bank with a "
        "large residential mortgage book using IRB models, with a numeric example.",
    ],
}


def _fill(template: str, rng: random.Random) -> str:
    values: dict[str, str] = {}
    for key, pool in (*SLOTS.items(), *EXTRA_SLOTS.items()):
        if "{" + key + "}" in template:
            values[key] = rng.choice(pool)
    # n2b must differ from n2 so that comparisons are not degenerate
    if "{n2b}" in template:
        values["n2b"] = rng.choice([v for v in SLOTS["n2"] if v != values.get("n2")])
    pastes = {
        "email": lambda: _paste(rng, EMAIL_LINES, 5, 12),
        "email_short": lambda: _paste(rng, EMAIL_LINES, 1, 3),
        "notes": lambda: "\n".join(rng.sample(NOTE_LINES, k=rng.randint(4, 8))),
        "email_de": lambda: _paste(rng, DE_EMAIL_LINES, 3, 6),
        "email_fr": lambda: _paste(rng, FR_EMAIL_LINES, 3, 5),
        "email_es": lambda: _paste(rng, ES_EMAIL_LINES, 3, 5),
        "code": lambda: rng.choice(CODE_SNIPPETS),
        "conc_code": lambda: rng.choice(CONCURRENT_SNIPPETS),
        "clause": lambda: rng.choice(CONTRACT_CLAUSES),
    }
    for key, make in pastes.items():
        if "{" + key + "}" in template:
            values[key] = make()
    return template.format(**values)


# Surface noise so that a model cannot key on the exact opening words of a template.
PREFIXES = ["", "", "", "Quick question: ", "Hey, ", "Please help: ", "Hi! ", "I need help. "]
SUFFIXES = ["", "", "", " Thanks!", " Be concise.", " thx", " Please answer in detail."]


def _decorate(text: str, lang: str, rng: random.Random) -> str:
    if lang != "en":
        return text
    text = rng.choice(PREFIXES) + text + rng.choice(SUFFIXES)
    return text.lower() if rng.random() < 0.15 else text


def generate(seed: int = SEED, per_template: int = SAMPLES_PER_TEMPLATE) -> Iterator[Row]:
    """Yield the templated rows in a fixed order; the same seed gives the same rows."""
    rng = random.Random(seed)
    for family, template_id, label, lang, text in TEMPLATES:
        seen: set[str] = set()
        for _ in range(per_template * 4):  # a few retries: templates with small slot pools repeat
            prompt = _decorate(_fill(text, rng), lang, rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            yield Row(prompt, label, family, template_id, lang, "generated")
            if len(seen) == per_template:
                break


def write_jsonl(rows: list[Row], path: Path) -> None:
    """Write rows one JSON object a line, keys sorted, so the file is byte-stable across runs."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row), ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[Row]:
    """Read rows written by :func:`write_jsonl` (or by hand in the same shape)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(Row(**json.loads(line)))
    return rows


def main() -> None:
    rows = list(generate())
    write_jsonl(rows, GENERATED_PATH)
    print(json.dumps({"rows": len(rows), "path": str(GENERATED_PATH)}))


if __name__ == "__main__":
    main()
