"""Train the person-name model and write ``inference/assets/pii/names.json.gz`` (dev only: needs Faker, scikit-learn, wordfreq).

    python -m inference.pii.train_names            # retrain and write the shipped model
    python -m inference.pii.train_names --check    # exit 1 if the shipped model is not what this would train

Gazetteers are Faker's first- and last-name lists for the gazetteer locales; the classifier is an L2
logistic regression over ``names.token_features`` of every capitalised token in generated training
sentences (``synthetic.training_examples``), labelled 1 inside a gold PERSON span. Only weights that matter
are kept, rounded, so the asset stays small and the runtime needs neither scikit-learn nor numpy.
Deterministic: the same seed gives byte-identical output. The model records its provenance (a hash of the
training data and of this file, and the versions of the libraries that made it); ``--check`` recomputes it without
fitting (a few seconds), so that a change to the training inputs without a retrain fails the tests.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import logging
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import wordfreq
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression

from inference.pii.names import (
    MODEL_FORMAT,
    MODEL_PATH,
    NAME_PARTICLES,
    Gazetteer,
    is_capitalised,
    token_features,
    tokenise,
)
from inference.pii.public_figures import PUBLIC_FIGURES
from inference.pii.synthetic import (
    GAZETTEER_LOCALES,
    Example,
    faker_names,
    reexec_with_fixed_hash_seed,
    training_examples,
)

log = logging.getLogger(__name__)

TRAIN_SEED = 20261201
TRAIN_SENTENCES = 12_000
MIN_FEATURE_COUNT = 2  # a lexical feature seen once is noise, not evidence
MIN_ABS_WEIGHT = 0.02
THRESHOLD = 0.5
# Generated sentences come from a few dozen templates, so the words around a name ("Dear", "think ... deserves")
# would explain every label on their own and the model would learn nothing about names themselves. Dropping
# the lexical features (neighbour words, the word itself) from half the training rows makes the gazetteer,
# suffix and shape features carry weight too, which is what carries over to unseen sentences.
FEATURE_DROPOUT = 0.5
_DROPPABLE = ("p1=", "p2=", "n1=", "w=")
# Stronger than sklearn's default (C=1): generated sentences repeat, and memorising them hurts new text.
REGULARISATION_C = 0.3


# How many of each language's most frequent words (wordfreq) go into the common-word list.
COMMON_WORDS = {"en": 40_000, "de": 10_000, "fr": 10_000, "es": 10_000, "it": 10_000, "nl": 10_000}


# Product and technology names that prompts to an LLM platform mention all the time and that a word list
# built from general text ranks low; "common" for the model, so "deploy to Kubernetes" names no one.
TECH_WORDS = (
    "kubernetes docker postgresql postgres mysql sqlite redis celery django flask fastapi react angular vue"
    " svelte nextjs nodejs deno typescript javascript python rust golang java kotlin swift scala haskell"
    " terraform ansible jenkins github gitlab bitbucket jira confluence slack notion figma salesforce"
    " hubspot zendesk tableau looker snowflake databricks bigquery redshift kafka rabbitmq nginx apache"
    " linux ubuntu debian fedora centos windows macos android ios chrome firefox safari openai anthropic"
    " chatgpt claude gemini llama mistral pytorch tensorflow keras numpy pandas scipy jupyter vscode"
    " intellij pycharm xcode azure aws gcp lambda cloudflare vercel netlify heroku stripe paypal twilio"
    " sendgrid mailchimp shopify wordpress drupal magento grafana prometheus kibana elasticsearch"
    " opensearch datadog sentry splunk pagerduty okta auth0 keycloak vault consul nomad helm istio"
    " envoy graphql grpc protobuf webpack vite babel eslint prettier pytest jest mocha cypress playwright"
    " selenium excel powerpoint outlook sharepoint onedrive dropbox zoom teams webex airflow dagster"
    " prefect dbt spark hadoop hive presto trino clickhouse cassandra mongodb dynamodb firestore supabase"
).split()


# The libraries whose data or arithmetic the model depends on: Faker's name lists, wordfreq's word lists, the fit.
TRAINING_LIBRARIES = ("faker", "wordfreq", "scikit-learn", "numpy", "scipy")

# A listed figure's name is read as "First [Middle ...] Last" only where it has that shape: a lower-case word other
# than a name particle makes it an epithet ("Alexander the Great", "Joan of Arc", "Wright brothers"), a regnal
# number or an initial is no name ("Henry VIII", "Malcolm X", "John F. Kennedy"), and a title opens it without
# being a first name ("Pope Francis", "Mother Teresa", "Lady Gaga").
_FIGURE_TITLES = frozenset("pope queen king mother saint lady dalai".split())
_REGNAL_NUMBER = re.compile(r"[IVXLC]+")
# A famous first or last name stays a common word when it is one of a language's most frequent words: "che" and
# "ho" (Italian "that", "I have"), "Mann" (German "man"), "may", "page" are far more often the word than the
# figure (Che Guevara, Ho Chi Minh, Thomas Mann, Theresa May, Larry Page).
KEEP_COMMON_RANK = 1_000


def figure_names(figures: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Lower-cased (first names, last names) of the listed figures whose names are "First [Middle ...] Last"."""
    first: set[str] = set()
    last: set[str] = set()
    for figure in figures:
        words = figure.split()
        if any(word.islower() and word not in NAME_PARTICLES for word in words):
            continue
        names = [
            w.lower() for w in words if w[0].isupper() and len(w.rstrip(".")) > 1 and not _REGNAL_NUMBER.fullmatch(w)
        ]
        if names and names[0] in _FIGURE_TITLES:
            names = names[1:]
        if len(names) >= 2:
            first.add(names[0])
            last.add(names[-1])
    return frozenset(first), frozenset(last)


def build_gazetteer(locales: tuple[str, ...] = GAZETTEER_LOCALES) -> Gazetteer:
    first, last = faker_names(locales)
    # Famous people's names are frequent words ("obama", "elon"); they belong in the name lists, or a public
    # figure's name next to their private details would go unseen.
    famous_first, famous_last = figure_names(PUBLIC_FIGURES)
    frequent = {w for lang in COMMON_WORDS for w in wordfreq.top_n_list(lang, KEEP_COMMON_RANK)}
    common = {w for lang, n in COMMON_WORDS.items() for w in wordfreq.top_n_list(lang, n) if w.isalpha() and len(w) > 1}
    common.update(w.lower() for w in TECH_WORDS)
    common -= (famous_first | famous_last) - frequent
    return Gazetteer(first | famous_first, last | famous_last, frozenset(common))


def labelled_tokens(
    examples: list[Example], gazetteer: Gazetteer, rng: random.Random
) -> tuple[list[list[str]], list[int]]:
    rows: list[list[str]] = []
    labels: list[int] = []
    for example in examples:
        spans = [(g.start, g.end) for g in example.gold if g.kind == "PERSON"]
        tokens = tokenise(example.text)
        for i, token in enumerate(tokens):
            if not is_capitalised(token.text):
                continue
            features = token_features(tokens, i, example.text, gazetteer)
            rows.append([f for f in features if not (f.startswith(_DROPPABLE) and rng.random() < FEATURE_DROPOUT)])
            labels.append(int(any(a <= token.start and token.end <= b for a, b in spans)))
    return rows, labels


def training_inputs(
    seed: int = TRAIN_SEED, sentences: int = TRAIN_SENTENCES
) -> tuple[Gazetteer, list[list[str]], list[int]]:
    """The gazetteer and the labelled feature rows the fit sees: everything but the fit itself."""
    gazetteer = build_gazetteer()
    rows, labels = labelled_tokens(training_examples(seed, sentences), gazetteer, random.Random(seed))
    return gazetteer, rows, labels


def provenance(gazetteer: Gazetteer, rows: list[list[str]], labels: list[int]) -> dict[str, object]:
    """What a model was made from: a hash of its training data (gazetteers, feature rows, labels) and of this file
    (the hyperparameters and the fit), and the libraries' versions: equal provenance, the same bytes (measured)."""
    data = hashlib.sha256()
    for part in (sorted(gazetteer.first_names), sorted(gazetteer.last_names), sorted(gazetteer.common_words)):
        data.update(json.dumps(part, ensure_ascii=False).encode("utf-8"))
    for row, label in zip(rows, labels, strict=True):
        data.update(json.dumps([label, row], ensure_ascii=False).encode("utf-8"))
    return {
        "training_data_sha256": data.hexdigest(),
        "trainer_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "libraries": {name: importlib.metadata.version(name) for name in TRAINING_LIBRARIES},
    }


def train(seed: int = TRAIN_SEED, sentences: int = TRAIN_SENTENCES) -> dict[str, object]:
    gazetteer, rows, labels = training_inputs(seed, sentences)
    made_from = provenance(gazetteer, rows, labels)
    counts = Counter(feature for row in rows for feature in row)
    rows = [[f for f in row if counts[f] >= MIN_FEATURE_COUNT] for row in rows]
    vectoriser = DictVectorizer()
    matrix = vectoriser.fit_transform([dict.fromkeys(row, 1) for row in rows])
    model = LogisticRegression(C=REGULARISATION_C, max_iter=2000, fit_intercept=False)
    model.fit(matrix, labels)
    log.info("trained on %d capitalised tokens (%d positive)", len(labels), sum(labels))
    weights = {
        name: round(float(w), 4)
        for name, w in zip(vectoriser.get_feature_names_out(), model.coef_[0], strict=True)
        if abs(w) >= MIN_ABS_WEIGHT or name == "bias"
    }
    return {
        "format": MODEL_FORMAT,
        "about": "person-name token classifier; rebuild with python -m inference.pii.train_names",
        "seed": seed,
        "provenance": made_from,
        "threshold": THRESHOLD,
        "first_names": sorted(gazetteer.first_names),
        "last_names": sorted(gazetteer.last_names),
        "common_words": sorted(gazetteer.common_words),
        "weights": dict(sorted(weights.items())),
    }


def stale_provenance(path: Path = MODEL_PATH) -> list[str]:
    """The provenance fields in which the model at ``path`` differs from what training would use now (empty: it
    is what ``train()`` would write). Reads the model and builds the training data; does not fit."""
    shipped = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8")).get("provenance") or {}
    if shipped.get("trainer_sha256") != hashlib.sha256(Path(__file__).read_bytes()).hexdigest():
        return ["trainer_sha256"]  # the training data may not even be built the same way: retrain
    current = provenance(*training_inputs())
    return [key for key, value in current.items() if shipped.get(key) != value]


def main() -> None:
    reexec_with_fixed_hash_seed("inference.pii.train_names")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_PATH)
    parser.add_argument(
        "--check", action="store_true", help="compare the model at --out with what training would use now; no fit"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        stale = stale_provenance(args.out)
        if stale:
            log.error("%s is stale (%s differ): retrain with python -m inference.pii.train_names", args.out, stale)
            sys.exit(1)
        log.info("%s is what python -m inference.pii.train_names builds", args.out)
        return
    payload = train()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    # mtime=0: the same model gives the same bytes, so a retrain that changes nothing shows no diff.
    args.out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    log.info("wrote %s (%d weights)", args.out, len(payload["weights"]))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
