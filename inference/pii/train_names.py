"""Train the person-name model and write ``inference/assets/pii/names.json.gz`` (dev only: needs Faker, scikit-learn, wordfreq).

    python -m inference.pii.train_names

Gazetteers are Faker's first- and last-name lists for the gazetteer locales; the classifier is an L2
logistic regression over ``names.token_features`` of every capitalised token in generated training
sentences (``synthetic.training_examples``), labelled 1 inside a gold PERSON span. Only weights that matter
are kept, rounded, so the asset stays small and the runtime needs neither scikit-learn nor numpy.
Deterministic: the same seed gives byte-identical output.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
from collections import Counter
from pathlib import Path

import wordfreq
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression

from inference.pii.names import MODEL_FORMAT, MODEL_PATH, Gazetteer, is_capitalised, token_features, tokenise
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


def build_gazetteer(locales: tuple[str, ...] = GAZETTEER_LOCALES) -> Gazetteer:
    first, last = faker_names(locales)
    # Famous people's names are frequent words ("obama", "elon"); they belong in the name lists, or a
    # public figure's name next to their private details would go unseen.
    famous = [name.lower().split() for name in PUBLIC_FIGURES if " " in name]
    first |= {parts[0] for parts in famous}
    last |= {parts[-1] for parts in famous}
    common = {w for lang, n in COMMON_WORDS.items() for w in wordfreq.top_n_list(lang, n) if w.isalpha() and len(w) > 1}
    common.update(w.lower() for w in TECH_WORDS)
    common -= {part for parts in famous for part in parts}
    return Gazetteer(first, last, frozenset(common))


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


def train(seed: int = TRAIN_SEED, sentences: int = TRAIN_SENTENCES) -> dict[str, object]:
    gazetteer = build_gazetteer()
    rows, labels = labelled_tokens(training_examples(seed, sentences), gazetteer, random.Random(seed))
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
        "threshold": THRESHOLD,
        "first_names": sorted(gazetteer.first_names),
        "last_names": sorted(gazetteer.last_names),
        "common_words": sorted(gazetteer.common_words),
        "weights": dict(sorted(weights.items())),
    }


def main() -> None:
    reexec_with_fixed_hash_seed("inference.pii.train_names")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_PATH)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    payload = train()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    # mtime=0: the same model gives the same bytes, so a retrain that changes nothing shows no diff.
    args.out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    log.info("wrote %s (%d weights)", args.out, len(payload["weights"]))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
