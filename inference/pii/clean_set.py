"""Generated PII-free prompts for the precision check (``evaluate``'s ``clean_prompts``), labelled by category, and
a few personal counterparts that must still be found.

Categories are the name model's usual false alarms: places (cities, countries, rivers, regions), products and
companies, example names in programming and teaching questions, capitalised words opening sentences in German,
French, Spanish, Italian and Dutch, historical and public figures, names inside theorem and law names, and
one-letter or function-word tokens; and (2026-12) lone capitalised words (German and Dutch nouns, months and
holidays, sentence openers, labels, mixed-case acronyms), documentation values (reserved e-mail domains and IP
ranges, vendors' example keys, IBANs and test cards, never-issued SSNs, placeholder and fictional names) and
secret variable names in code. The filler lists here are written by hand and are not the lists the
detector's gazetteers are built from (``non_names_build``), though real places and scientists overlap.
"""

from __future__ import annotations

import random
import re

from inference.pii.synthetic import Example, Gold

_PLACES = (
    "Lisbon", "Porto", "Kyoto", "Osaka", "Nairobi", "Lagos", "Cairo", "Marrakesh", "Buenos Aires", "Santiago",
    "Lima", "Bogotá", "Toronto", "Vancouver", "Montreal", "Chicago", "Seattle", "Denver", "Boston", "Atlanta",
    "Dublin", "Edinburgh", "Manchester", "Leeds", "Hamburg", "Munich", "Cologne", "Dresden", "Leipzig", "Vienna",
    "Salzburg", "Zurich", "Geneva", "Lyon", "Marseille", "Bordeaux", "Toulouse", "Seville", "Valencia", "Bilbao",
    "Granada", "Florence", "Venice", "Naples", "Turin", "Bologna", "Rotterdam", "Utrecht", "Antwerp", "Bruges",
    "Krakow", "Prague", "Budapest", "Bucharest", "Athens", "Istanbul", "Helsinki", "Oslo", "Stockholm",
    "Copenhagen", "Reykjavik", "Tallinn", "Riga", "Vilnius", "Mumbai", "Delhi", "Bangalore", "Jakarta", "Manila",
    "Hanoi", "Seoul", "Melbourne", "Sydney", "Perth", "Auckland", "Wellington", "Portugal", "Morocco", "Kenya",
    "Chile", "Peru", "Argentina", "Norway", "Finland", "Austria", "Switzerland", "Belgium", "Vietnam",
    "Indonesia", "Georgia", "Jordan", "Bavaria", "Tuscany", "Provence", "Andalusia", "Patagonia", "Scotland",
    "Brittany", "Normandy", "Texas", "California", "Alaska", "Virginia", "Florida", "Ontario", "Quebec",
)  # fmt: skip
_RIVERS = (
    "the Danube", "the Rhine", "the Elbe", "the Seine", "the Loire", "the Thames", "the Nile", "the Amazon",
    "the Mississippi", "the Ganges", "the Tagus", "the Po", "the Volga", "the Mekong",
)  # fmt: skip
_PRODUCTS = (
    "Figma", "Notion", "Airtable", "Shopify", "Stripe", "Twilio", "Heroku", "Netlify", "Vercel", "Grafana",
    "Prometheus", "Kafka", "Cassandra", "Elasticsearch", "Kibana", "Jenkins", "Bamboo", "Zapier", "Trello",
    "Asana", "HubSpot", "Mailchimp", "Dropbox", "Spotify", "Netflix", "Tesla", "Oracle", "Cisco", "Adobe",
    "Nvidia", "Siemens", "Bosch", "Nestlé", "Unilever", "Carrefour", "Zalando", "Volkswagen", "Renault",
    "Toyota", "Samsung", "Huawei", "Xiaomi", "Pandas", "NumPy", "Matplotlib", "Flask", "FastAPI", "Laravel",
    "Symfony", "Angular", "Svelte", "Hugo", "Jekyll", "Gatsby", "Ruby", "Scala", "Julia", "Swift",
)  # fmt: skip
_FIGURES = (
    "Aristotle", "Plato", "Socrates", "Julius Caesar", "Cleopatra", "Charlemagne", "Joan of Arc", "Genghis Khan",
    "Christopher Columbus", "Ferdinand Magellan", "Martin Luther", "Otto von Bismarck", "Queen Victoria",
    "Catherine the Great", "Peter the Great", "Simón Bolívar", "Frederick Douglass", "Harriet Tubman",
    "Rosa Parks", "Malcolm X", "Fidel Castro", "Che Guevara", "Mao Zedong", "Joseph Stalin", "Adolf Hitler",
    "Benito Mussolini", "Franklin D. Roosevelt", "Dwight Eisenhower", "Mikhail Gorbachev", "Konrad Adenauer",
    "Willy Brandt", "François Mitterrand", "Simone de Beauvoir", "Jean-Paul Sartre", "Albert Camus",
    "Friedrich Nietzsche", "Immanuel Kant", "René Descartes", "Voltaire", "Jean-Jacques Rousseau",
    "Virginia Woolf", "Franz Kafka", "Thomas Mann", "Hermann Hesse", "Bertolt Brecht", "Gabriel García Márquez",
    "Pablo Neruda", "Jorge Luis Borges", "Federico García Lorca", "Umberto Eco", "George Orwell", "Mark Twain",
    "Toni Morrison", "Fyodor Dostoevsky", "Anton Chekhov", "Rembrandt", "Claude Monet", "Salvador Dalí",
    "Michelangelo", "Raphael", "Gustav Klimt", "Edvard Munch", "Frédéric Chopin", "Richard Wagner",
    "Giuseppe Verdi", "Antonio Vivaldi", "Johannes Brahms", "Marie Antoinette", "Louis XIV", "Henry VIII",
    "Richard Feynman", "Niels Bohr", "Werner Heisenberg", "Max Planck", "Erwin Schrödinger", "Dmitri Mendeleev",
    "Louis Pasteur", "Gregor Mendel", "Rosalind Franklin", "Carl Sagan", "Johannes Kepler", "Nicolaus Copernicus",
    "John von Neumann", "Claude Shannon", "Edsger Dijkstra", "Donald Knuth", "Barbara Liskov",
)  # fmt: skip
_EPONYMS = (
    "Fermat's last theorem", "Ohm's law", "Bayes' theorem", "Bayes theorem", "Newton's second law",
    "Dijkstra's algorithm", "Kruskal's algorithm", "Prim's algorithm", "Euler's formula", "Euler's identity",
    "Gauss's law", "Hooke's law", "Boyle's law", "Murphy's law", "Moore's law", "Zipf's law", "Amdahl's law",
    "Conway's law", "Kirchhoff's current law", "Faraday's law", "Snell's law", "Pascal's triangle",
    "Pythagoras' theorem", "Stokes' theorem", "Green's theorem", "Noether's theorem", "Gödel's incompleteness theorem",
    "Heisenberg's uncertainty principle", "Pauli's exclusion principle", "Occam's razor", "Hilbert's hotel",
    "Maxwell's equations", "Navier-Stokes equations", "Schrödinger's cat", "Fourier transform", "Laplace transform",
    "Markov chain", "Poisson distribution", "Bernoulli trial", "Gaussian elimination", "Levenshtein distance",
    "Huffman coding", "Hamming distance", "Bellman-Ford algorithm", "Floyd-Warshall algorithm", "Turing machine",
    "Pareto principle", "Nash equilibrium", "Planck's constant", "Avogadro's number", "Doppler effect",
    "Pearson correlation", "Fisher's exact test", "Student's t-test", "Cauchy-Schwarz inequality",
)  # fmt: skip
_EPONYM_FOREIGN = (
    "Erkläre den Satz von Bayes mit einem Beispiel.",
    "Wie beweist man den Satz des Pythagoras?",
    "Was besagt das Gesetz von Ohm?",
    "Explique le théorème de Fermat simplement.",
    "Quelle est la loi de Hooke ?",
    "¿Qué dice el teorema de Bayes?",
    "Explica la ley de Ohm con un ejemplo.",
    "Spiega il teorema di Pitagora.",
)
_PLACEHOLDERS = (
    ("Alice", "Bob"), ("Alice", "Eve"), ("Bob", "Carol"), ("Alice", "Charlie"), ("Bob", "Mallory"),
)  # fmt: skip
_PLACEHOLDER_FULL = ("John Doe", "Jane Doe", "Max Mustermann", "Erika Mustermann", "John Smith", "Jane Smith")
_LETTERS = ("O", "B", "A", "C", "X", "N", "K")

# Lone capitalised words that are no names: German nouns (some misspelt, as typed), months, weekdays and holidays
# in six languages, ordinary words opening a sentence or a line, mixed-case acronyms.
_GERMAN_NOUNS = (
    "Gemeindehalle", "Kundenkartei", "Zeile", "Vorlage", "Abrechnung", "Nachweis", "Mahnung", "Kündigung",
    "Betriebskosten", "Vereinssatzung", "Anmeldeformular", "Überweisung", "Kassenprüfung", "Jahresbericht",
    "Wohngeld", "Schulanmeldung", "Eintrittskarten", "Bauantrag", "Zwischenzeugnis", "Nebenkostenabrechung",
    "Protokol", "Rechnungsadresse", "Spendenquittung", "Tabelle", "Feuerwehrfest", "Elternabend",
)  # fmt: skip
_DUTCH_NOUNS = ("Gemeentehuis", "Factuur", "Vergadering", "Jaarverslag", "Huurcontract", "Kolom")
_CALENDAR = (
    "March", "May", "June", "July", "August", "Monday", "Friday", "März", "Juni", "Oktober", "Mittwoch",
    "Samstag", "Avril", "Juillet", "Mardi", "Dimanche", "Enero", "Junio", "Viernes", "Domingo", "Giugno",
    "Settembre", "Venerdì", "Augustus", "Woensdag", "Ostern", "Weihnachten", "Pâques", "Navidad", "Natale",
    "Christmas", "Easter", "Pfingsten", "Kerstmis",
)  # fmt: skip
_OPENERS = (
    "Rain", "Bread", "Honey", "Stone", "Short", "Brown", "Green", "Young", "Little", "Rich", "Strong", "Fair",
)  # fmt: skip
_ACRONYMS = ("PaaS", "IaaS", "SaaS", "GmbH", "PhD", "MiB", "GiB", "DevOps", "FinOps", "iOS", "macOS", "WiFi")

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "place": (
        "Plan a three-day trip to {PLACE} in October.",
        "What is the best way to get from {PLACE} to {PLACE} by train?",
        "{PLACE} or {PLACE}: which is cheaper for a conference?",
        "Write a short poem about the rain in {PLACE}.",
        "How far is {PLACE} from {PLACE}?",
        "Ich fahre nächste Woche nach {PLACE}. Was sollte ich mir ansehen?",
        "Quel temps fait-il à {PLACE} en mars ?",
        "¿Qué puedo visitar en {PLACE} en un día?",
        "Cosa vedere a {PLACE} in due giorni?",
        "Which countries does {RIVER} flow through?",
        "Describe the history of {PLACE}.",
        "{PLACE} has a population of about two million.",
        "Translate 'welcome to {PLACE}' into Italian.",
        "Is {PLACE} safe for solo travellers?",
    ),
    "product or company": (
        "How do I connect {PRODUCT} to {PRODUCT}?",
        "{PRODUCT} keeps crashing after the update. Any ideas?",
        "Compare {PRODUCT} and {PRODUCT} for a small team.",
        "Write a product description for a {PRODUCT} integration.",
        "Why did {PRODUCT} stock fall last quarter?",
        "Wie installiere ich {PRODUCT} unter Linux?",
        "Comment migrer de {PRODUCT} vers {PRODUCT} ?",
        "¿Es {PRODUCT} mejor que {PRODUCT} para empezar?",
    ),
    "placeholder": (
        "In the Diffie-Hellman example, {A} sends a public key to {B}. Why can't an eavesdropper compute the secret?",
        "Write a Python function that greets a user, e.g. greet('{A}') returns 'Hello, {A}!'.",
        "Explain public-key encryption using {A} and {B} as an example.",
        "In this SQL example, insert a row for {FULL} into the customers table.",
        "The docs use {FULL} as the sample user. How do I replace it in the template?",
        "Schreibe ein Beispiel für ein Formular mit {FULL} als Platzhalter.",
        "My unit test creates a user named {FULL}; how do I mock the database?",
        "{A} and {B} play a game: {A} picks a number and {B} guesses it. What is the optimal strategy?",
        "Give me a JSON example of a contact with the name {FULL}.",
    ),
    "sentence start": (
        "Die Katze schläft. Wie übersetze ich das ins Englische?",
        "Der Bericht ist fertig. Bitte fasse ihn zusammen.",
        "Kannst du mir helfen? Morgen habe ich eine Prüfung in Mathematik.",
        "Heute regnet es. Schreib mir ein kurzes Gedicht darüber.",
        "Leider funktioniert das Skript nicht. Woran kann das liegen?",
        "Bonjour ! Pouvez-vous corriger ce texte ? Merci beaucoup.",
        "Demain je pars en vacances. Quelles applications de voyage recommandez-vous ?",
        "Hier soir, la réunion a duré trois heures. Comment la raccourcir ?",
        "Pourquoi le ciel est-il bleu ? Expliquez simplement.",
        "Hola. Necesito una receta de paella para seis personas.",
        "Mañana tengo una entrevista. Dame consejos para prepararme.",
        "Ayer compré un portátil nuevo. ¿Cómo lo configuro?",
        "Buenos días. Quisiera mejorar mi currículum.",
        "Ciao! Mi aiuti a scrivere una lettera formale?",
        "Domani piove. Cosa posso fare in casa con i bambini?",
        "Gisteren werkte de app nog. Wat kan er mis zijn?",
        "Graag een samenvatting van dit artikel.",
        "Amen. Explain the origin of this word.",
        "Bitte erkläre mir, wie Photosynthese funktioniert.",
        "Vielen Dank für die Erklärung. Noch eine Frage: was ist ein Quark?",
    ),
    "public figure": (
        "What did {FIGURE} contribute to history?",
        "Write a short biography of {FIGURE}.",
        "Compare the ideas of {FIGURE} and {FIGURE}.",
        "Wer war {FIGURE}?",
        "Qui était {FIGURE} ?",
        "¿Quién fue {FIGURE}?",
        "Summarise the main works of {FIGURE} in three bullet points.",
        "Why is {FIGURE} still famous today?",
    ),
    "eponym": (
        "Explain {EPONYM} with a simple example.",
        "Can you prove {EPONYM}?",
        "What is {EPONYM} used for in practice?",
        "How does {EPONYM} relate to {EPONYM}?",
        "{FOREIGN}",
    ),
    "letter or function word": (
        "What is the time complexity {LETTER}(n log n) in practice?",
        "Let {LETTER} be a set of integers. Prove that {LETTER} has a least element.",
        "Point {LETTER} lies on the circle. Find the angle at {LETTER}.",
        "Vitamin {LETTER} deficiency: what are the symptoms?",
        "Plan {LETTER}: what do we do if the launch slips?",
        "Is blood type {LETTER} compatible with type {LETTER}?",
    ),
    "lone capitalised word": (
        "Kannst du die {NOUN} bis morgen fertig machen? Sie liegt im Ordner.",
        "Wo finde ich die {NOUN}? Ich brauche sie für den Verein.",
        "Bitte prüfe, ob die {NOUN} vollständig ist, und schreib mir eine kurze Antwort.",
        "Wir haben {NOUN} und {NOUN} noch nicht bekommen. Was soll ich tun?",
        "Formuliere eine höfliche Erinnerung wegen der {NOUN}.",
        "Kun je de {DUTCH} vertalen naar het Engels?",
        "We are closed in {CALENDAR}. Please write a short notice for the website.",
        "Im {CALENDAR} ist das Büro geschlossen. Schreib bitte einen Aushang.",
        "Quels sont les horaires en {CALENDAR} ?",
        "Hasta {CALENDAR} no tenemos vacaciones.",
        "{CALENDAR}: plan the team offsite agenda.",
        "{OPENER} is the theme of my essay. Give me three opening lines.",
        "{OPENER} prices went up again. Explain why in two sentences.",
        "Update: the build passes now.\n{OPENER} question: how do I cache the wheels?",
        "Edit: fixed the link.\nNote: the slides are in the shared drive.",
        "Is {ACRONYM} worth it for a team of five?",
        "Compare {ACRONYM} pricing with running our own servers.",
        "Das ist z. B. bei der {NOUN} so. Wie formuliere ich das besser?",
        "Siehe Abschnitt {LETTER}. Dort steht z. B. die {NOUN}.",
    ),
    "documentation value": (
        "Why does {DOC_EMAIL} fail my e-mail validation regex?",
        "In the docs, send a test message to {DOC_EMAIL} and check the logs.",
        "Our firewall blocks {DOC_IP}. How do I whitelist it?",
        "Allow the subnet {CIDR} in the security group.",
        "The tutorial uses the key {DOC_KEY}. Where do I put mine?",
        "Explain the IBAN check digits using {DOC_IBAN} as the example.",
        "Checkout fails with card {DOC_CARD}, expiry 12/34, CVC 123. What is wrong with my integration?",
        "Is {DOC_SSN} a valid SSN format for my form validator?",
        "Fill the sample form for {PLACEHOLDER_NAME}, Musterstraße 1, 12345 Musterstadt.",
        "Write a short scene where {FICTIONAL} explains the case to {FICTIONAL}.",
        "Who is the best detective: {FICTIONAL} or {FICTIONAL}?",
    ),
    "code variable": (
        "Why does this fail?\n\ndef sign(secret, payload):\n    mac = hmac.new(secret, payload, 'sha256')\n"
        "    return {'signature': mac.hexdigest(), 'client_secret': secret}",
        "Refactor this:\nconfig = {'token': token, 'password': password, 'api_key': api_key}",
        "Is this safe?\nclient = Client(api_key=self.api_key, secret=settings.secret)",
        "Review: headers = {'Authorization': auth_header}; body = {'refresh_token': refresh_token}",
        "const opts = { password: opts.password, token: authToken };  // why is token undefined?",
    ),
}


def clean_examples(seed: int, per_category: int) -> list[tuple[str, Example]]:
    """``per_category`` PII-free prompts per category, as (category, example)."""
    rng = random.Random(seed)
    examples: list[tuple[str, Example]] = []
    for category, templates in _TEMPLATES.items():
        for _ in range(per_category):
            examples.append((category, Example(_fill(rng.choice(templates), rng), ())))
    return examples


def personal_counterparts(seed: int, count: int) -> list[Example]:
    """Prompts where a placeholder-like, place-like or famous-sounding name belongs to a private person with
    personal details: each must still hold a finding on the name (``evaluate`` reports the share found)."""
    rng = random.Random(seed)
    templates = (
        ("Alice Martin, my neighbour, asked me to forward her phone number +44 7700 900123 to the landlord.", "Alice"),
        ("Please email Bob at bob.keller@example.com about his overdue rent.", "Bob"),
        ("My name is Florence Dubois and I live at 12 Rue de la Paix, Paris.", "Florence Dubois"),
        ("Georgia Evans (DOB 14/03/1988) missed her appointment.", "Georgia Evans"),
        ("Dear Jordan Smith, your account 4111 1111 1111 1111 is overdue.", "Jordan Smith"),
        ("Patient: Virginia Hall, date of birth 02.05.1961, allergic to penicillin.", "Virginia Hall"),
        ("Hi, I'm Max Müller, call me on 0151 23456789.", "Max Müller"),
        ("Remind Paris Hilton-Baker about her dentist appointment on Tuesday.", "Paris Hilton-Baker"),
        ("Alice from accounting said her new address is 4 Elm Street, Leeds LS1 4AB.", "Alice"),
        ("Mrs. Newton, born 3 March 1957, asked about her pension.", "Newton"),
        ("Im August hat Herr Brandt zweimal angerufen. Bitte ruf ihn zurück.", "Brandt"),
        ("Liebe Zeynep, die Abrechnung ist fertig.", "Zeynep"),
    )
    # A real value next to its documentation look-alike: the look-alike is dropped, the value must stay.
    valued = (
        ("Not user@example.com: my real address is lena.vogt@posteo.de, please update it.", "lena.vogt@posteo.de", "EMAIL"),
        ("The docs use 203.0.113.9, but the failed logins came from 81.206.130.46.", "81.206.130.46", "IP_ADDRESS"),
        ("Not the sample AKIAIOSFODNN7EXAMPLE: ours is AKIA2OGYBAH6QJTM4XZP, rotate it.", "AKIA2OGYBAH6QJTM4XZP", "CREDENTIAL"),
        ("Subnet 10.8.0.0/22 is fine; the host 81.206.130.46/24 is my home router.", "81.206.130.46", "IP_ADDRESS"),
        ("config = {'client_secret': secret}  # secret = 'Zr8u2mQx!pL4' in prod", "Zr8u2mQx!pL4", "CREDENTIAL"),
    )  # fmt: skip
    examples = []
    for text, name in (rng.choice(templates) for _ in range(count)):
        start = text.index(name)
        examples.append(Example(text, (Gold("PERSON", start, start + len(name), "counterpart"),)))
    for text, value, kind in (rng.choice(valued) for _ in range(max(1, count // 2))):
        start = text.index(value)
        examples.append(Example(text, (Gold(kind, start, start + len(value), "counterpart"),)))
    return examples


_DOC_EMAILS = (
    "user@example.com", "jane.doe@example.org", "noreply@mail.example.net", "ci-bot@build.test", "admin@site.example",
    "bounce@nowhere.invalid",
)  # fmt: skip
_DOC_IPS = ("192.0.2.17", "198.51.100.23", "203.0.113.250", "10.20.30.40", "172.16.5.4", "192.168.0.1", "fd00::1")
_CIDRS = ("10.0.0.0/8", "10.8.0.0/22", "172.16.0.0/12", "198.51.100.0/24", "81.206.128.0/20", "2001:db8::/32")
_DOC_KEYS = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AKIAI44QH8DHBEXAMPLE")
_DOC_IBANS = ("DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "FR14 2004 1010 0505 0001 3M02 606")
_DOC_CARDS = ("4242 4242 4242 4242", "4111 1111 1111 1111", "5555 5555 5555 4444", "3782 822463 10005")
_DOC_SSNS = ("078-05-1120", "000-12-3456", "666-45-6789", "912-34-5678", "123-00-4567", "123-45-0000")
_PLACEHOLDER_NAMES = ("Max Mustermann", "Erika Mustermann", "John Doe", "Jane Doe", "Mario Rossi")
_FICTIONAL = ("Sherlock Holmes", "Hercule Poirot", "Miss Marple", "Dr Watson", "James Bond", "Harry Potter")


def _fill(template: str, rng: random.Random) -> str:
    a, b = rng.choice(_PLACEHOLDERS)
    fixed = {"A": a, "B": b, "FULL": rng.choice(_PLACEHOLDER_FULL), "LETTER": rng.choice(_LETTERS)}
    pools = {
        "PLACE": _PLACES,
        "RIVER": _RIVERS,
        "PRODUCT": _PRODUCTS,
        "FIGURE": _FIGURES,
        "EPONYM": _EPONYMS,
        "FOREIGN": _EPONYM_FOREIGN,
        "NOUN": _GERMAN_NOUNS,
        "DUTCH": _DUTCH_NOUNS,
        "CALENDAR": _CALENDAR,
        "OPENER": _OPENERS,
        "ACRONYM": _ACRONYMS,
        "DOC_EMAIL": _DOC_EMAILS,
        "DOC_IP": _DOC_IPS,
        "CIDR": _CIDRS,
        "DOC_KEY": _DOC_KEYS,
        "DOC_IBAN": _DOC_IBANS,
        "DOC_CARD": _DOC_CARDS,
        "DOC_SSN": _DOC_SSNS,
        "PLACEHOLDER_NAME": _PLACEHOLDER_NAMES,
        "FICTIONAL": _FICTIONAL,
    }

    def value(match: re.Match[str]) -> str:
        slot = match.group(1)
        return fixed[slot] if slot in fixed else rng.choice(pools[slot])

    return re.sub(r"\{([A-Z_]+)\}", value, template)
