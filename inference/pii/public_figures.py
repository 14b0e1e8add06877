"""The public-figure exception: a famous person's name in a public role is not PII.

"What did Barack Obama say in his 2009 inaugural address?" names a head of state acting in public; sending
it to the cloud tier exposes no one. The rule is deliberately simple: a PERSON finding whose words are a
listed public figure's full name, or a distinctive listed surname on its own, is dropped, unless the same
text also holds personal details (any other PII kind), because then the name is tied to private data
("Barack Obama's passport number is ..."). The list is short and hand-kept; a name not on it is reported.
"""

from __future__ import annotations

PUBLIC_FIGURES: tuple[str, ...] = (
    # heads of state and government, past and present
    "Barack Obama", "Michelle Obama", "Joe Biden", "Donald Trump", "George W. Bush", "George Bush", "Bill Clinton",
    "Hillary Clinton", "Kamala Harris", "Ronald Reagan", "Richard Nixon", "Jimmy Carter", "John F. Kennedy",
    "Abraham Lincoln", "George Washington", "Franklin Roosevelt", "Theodore Roosevelt", "Winston Churchill",
    "Margaret Thatcher", "Tony Blair", "Theresa May", "Boris Johnson", "Rishi Sunak", "Keir Starmer",
    "Angela Merkel", "Olaf Scholz", "Friedrich Merz", "Helmut Kohl", "Emmanuel Macron", "Charles de Gaulle",
    "Pedro Sánchez", "Giorgia Meloni", "Justin Trudeau", "Vladimir Putin", "Xi Jinping", "Narendra Modi",
    "Volodymyr Zelensky", "Ursula von der Leyen", "Nelson Mandela", "Mahatma Gandhi", "Napoleon Bonaparte",
    "Queen Elizabeth", "King Charles", "Pope Francis", "Dalai Lama", "Martin Luther King",
    # business and technology
    "Elon Musk", "Bill Gates", "Steve Jobs", "Tim Cook", "Mark Zuckerberg", "Jeff Bezos", "Sundar Pichai",
    "Satya Nadella", "Sam Altman", "Larry Page", "Sergey Brin", "Warren Buffett", "Jensen Huang", "Linus Torvalds",
    "Guido van Rossum", "Tim Berners-Lee", "Dennis Ritchie", "Ken Thompson", "Grace Hopper", "Alan Turing",
    "Ada Lovelace", "Steve Wozniak",
    # science, arts, letters
    "Albert Einstein", "Isaac Newton", "Marie Curie", "Charles Darwin", "Nikola Tesla", "Stephen Hawking",
    "Galileo Galilei", "Sigmund Freud", "Karl Marx", "William Shakespeare", "Jane Austen", "Leo Tolstoy",
    "Charles Dickens", "Ernest Hemingway", "Leonardo da Vinci", "Pablo Picasso", "Vincent van Gogh", "Frida Kahlo",
    "Wolfgang Amadeus Mozart", "Ludwig van Beethoven", "Johann Sebastian Bach", "Johann Wolfgang von Goethe",
    "Miguel de Cervantes", "Victor Hugo", "Dante Alighieri", "Greta Thunberg",
    # entertainment and sport
    "Taylor Swift", "Beyoncé", "Lady Gaga", "Elvis Presley", "Michael Jackson", "Paul McCartney", "John Lennon",
    "Bob Dylan", "Marilyn Monroe", "Charlie Chaplin", "Tom Hanks", "Leonardo DiCaprio", "Meryl Streep",
    "Brad Pitt", "Angelina Jolie", "Oprah Winfrey", "Kim Kardashian", "Shakira", "Lionel Messi",
    "Cristiano Ronaldo", "Serena Williams", "Michael Jordan", "LeBron James", "Roger Federer", "Rafael Nadal",
    "Novak Djokovic", "Usain Bolt", "Kylian Mbappé", "Zinedine Zidane",
)  # fmt: skip

_FULL_NAMES = frozenset(name.lower() for name in PUBLIC_FIGURES)
# Surnames alone ("Obama said ...") only where the surname is distinctive: "Ms. Williams" or "Dr. Cook" is
# far more often a private person than Serena Williams or Tim Cook. First names alone are never exempt.
_SURNAMES = frozenset(
    "obama biden trump clinton reagan nixon lincoln churchill thatcher merkel scholz macron meloni trudeau putin"
    " zelensky mandela gandhi napoleon musk zuckerberg bezos pichai nadella altman buffett torvalds einstein"
    " curie darwin hawking freud shakespeare tolstoy hemingway picasso mozart beethoven goethe cervantes"
    " beyoncé shakira messi ronaldo federer nadal djokovic mbappé zidane kardashian dicaprio".split()
)


def is_public_figure(name: str) -> bool:
    """Whether ``name`` (a PERSON finding's text) is a listed public figure's full name or surname."""
    key = " ".join(name.replace(".", ". ").split()).lower()
    return key in _FULL_NAMES or key in _SURNAMES
