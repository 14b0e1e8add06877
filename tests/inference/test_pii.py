"""The PII detector (inference.pii): every kind, each obfuscation, the look-alike and public-figure rules,
redaction and (streamed) restoration, the normaliser's offset map. Plain tests: no database, no Django."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import phonenumbers
import pytest
from faker import Faker
from hypothesis import given, settings
from hypothesis import strategies as st
from stdnum.cn import ric as cn_ric

from inference.pii import (
    Detector,
    PiiKind,
    PiiModelError,
    PiiReport,
    Redaction,
    StreamRestorer,
    default_detector,
    redact,
    scan,
)
from inference.pii.checksummed import luhn_valid
from inference.pii.names import MODEL_PATH, NameModel
from inference.pii.normalise import normalise
from inference.pii.obfuscation_set import obfuscation_examples
from inference.pii.train_names import figure_names


def kinds_of(text: str) -> set[str]:
    return {str(f.kind) for f in scan(text).findings}


def texts_of(text: str, kind: PiiKind) -> list[str]:
    return [f.text for f in scan(text).findings if f.kind is kind]


# the report ------------------------------------------------------------------------------------------


def test_report_of_clean_text_is_falsy_and_empty():
    report = scan("How do I reverse a list in Python?")
    assert not report
    assert report.findings == ()
    assert report.kinds == frozenset()


def test_report_findings_point_into_the_text_and_kinds_compare_to_strings():
    text = "Write to anna.berg@mailbox.org or call +44 20 7946 0958."
    report = scan(text)
    assert report
    assert report.kinds == {"EMAIL", "PHONE"}
    for finding in report.findings:
        assert text[finding.start : finding.end] == finding.text
        assert 0 < finding.score <= 1


def test_findings_are_sorted_and_never_overlap():
    report = scan("Card 4539 1488 0343 6467, IBAN DE18370400440532013017, mail a.b@c.de, SSN 536-22-8793.")
    starts = [f.start for f in report.findings]
    assert starts == sorted(starts)
    for before, after in zip(report.findings, report.findings[1:], strict=False):
        assert before.end <= after.start


def test_empty_text_has_no_findings():
    assert not scan("")


def test_very_long_text_is_scanned_to_the_end():
    text = "Plain filler text about databases and caching. " * 2500 + "Reach me at lena.kraus@mailbox.org"
    assert texts_of(text, PiiKind.EMAIL) == ["lena.kraus@mailbox.org"]


def test_default_detector_is_built_once_and_shared():
    assert default_detector() is default_detector()


def test_missing_name_model_raises_the_package_error(tmp_path: Path):
    with pytest.raises(PiiModelError):
        NameModel.load(tmp_path / "absent.json.gz")


def test_a_detector_can_be_built_with_its_own_model():
    detector = Detector(NameModel.load())
    assert detector.scan("Call me at +1 415 555 0132").kinds == {"PHONE"}


def test_shipped_name_model_is_what_its_training_command_builds():
    # The model records what it was trained from (training_data_sha256: gazetteers, feature rows and labels;
    # trainer_sha256: train_names.py; the libraries' versions). `train_names --check` rebuilds the training data
    # without fitting (a few seconds, under PYTHONHASHSEED=0 as training runs) and compares: a change to the name
    # lists, the public figures, the training templates, the features or the trainer fails here until the model
    # is retrained with `python -m inference.pii.train_names`.
    recorded = json.loads(gzip.decompress(MODEL_PATH.read_bytes())).get("provenance", {})
    assert set(recorded) == {"training_data_sha256", "trainer_sha256", "libraries"}, "model without provenance"
    check = subprocess.run(
        [sys.executable, "-m", "inference.pii.train_names", "--check"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert check.returncode == 0, check.stderr


def test_public_figures_add_only_their_first_and_last_names_to_the_name_lists():
    first, last = figure_names(
        ("John F. Kennedy", "Ludwig van Beethoven", "Alexander the Great", "Henry VIII", "Pope Francis", "Malcolm X")
    )
    assert (first, last) == ({"john", "ludwig"}, {"kennedy", "beethoven"})


# each kind -------------------------------------------------------------------------------------------


def test_email_is_found():
    assert texts_of("Send it to j.doe+invoices@acme-corp.co.uk please", PiiKind.EMAIL) == [
        "j.doe+invoices@acme-corp.co.uk"
    ]


@pytest.mark.parametrize(
    "address",
    ["user@example.com", "jane.doe@example.org", "bot@mail.example.net", "ci@build.test", "a@site.example",
     "x@nowhere.invalid"],
)  # fmt: skip
def test_email_at_a_reserved_domain_is_not_pii(address: str):
    assert not scan(f"In the docs, why does {address} fail validation?")


def test_real_address_next_to_a_reserved_one_is_still_an_email():
    text = "Not user@example.com: my address is lena.vogt@posteo.de, and examples.com is a real domain: a@examples.com"
    assert texts_of(text, PiiKind.EMAIL) == ["lena.vogt@posteo.de", "a@examples.com"]


def test_ssh_remote_is_not_an_email():
    assert "EMAIL" not in kinds_of("git clone git@github.com:org/repo.git")


@pytest.mark.parametrize(
    "text, number",
    [
        ("Call me at +1 (415) 555-0132.", "+1 (415) 555-0132"),
        ("My cell is 415-555-0132", "415-555-0132"),
        ("Tel. +44 20 7946 0958", "+44 20 7946 0958"),
        ("UK mobile: 07700 900123", "07700 900123"),
    ],
)
def test_english_phone_numbers_are_found(text: str, number: str):
    assert texts_of(text, PiiKind.PHONE) == [number]


def test_german_phone_number_is_found():
    assert texts_of("Meine Telefonnummer ist 030 12345678, ruf bitte abends an.", PiiKind.PHONE) == ["030 12345678"]


def test_french_phone_number_is_found():
    assert texts_of("Mon numéro de téléphone : 01 42 68 53 00", PiiKind.PHONE) == ["01 42 68 53 00"]


def test_spanish_phone_number_is_found():
    assert texts_of("Mi teléfono es +34 912 345 678, llámame.", PiiKind.PHONE) == ["+34 912 345 678"]


@pytest.mark.parametrize(
    "text, number",
    [
        ("電話番号は080-1234-5678です。", "080-1234-5678"),
        ("我的手机号码是138 1234 5678，谢谢", "138 1234 5678"),
        ("Мой телефон 8 (916) 123-45-67", "8 (916) 123-45-67"),
        ("휴대폰: 010-2345-6789", "010-2345-6789"),
        ("Celular: (11) 98765-4321", "(11) 98765-4321"),
        ("Forward to +61 412 345 678 please", "+61 412 345 678"),
    ],
)
def test_phone_numbers_of_other_regions_are_found_next_to_a_cue(text: str, number: str):
    assert texts_of(text, PiiKind.PHONE) == [number]


def test_phone_numbers_of_any_region_are_found_in_e164_or_after_a_cue():
    # phonenumbers' own example numbers of every region: E.164 always, the national form after "phone:".
    for region in sorted(phonenumbers.SUPPORTED_REGIONS - {"001"}):
        example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        if example is None or len(str(example.national_number)) < 7:
            continue
        e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
        national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
        assert "PHONE" in kinds_of(f"Send it to {e164} today."), (region, e164)
        assert "PHONE" in kinds_of(f"phone: {national}"), (region, national)


@pytest.mark.parametrize(
    "text",
    [
        "Our telephone survey reached 12,500 households in 2019.",
        "The phone plan costs 1,299.00 per year since 2019, tel. support included.",
        "build 20240117 of version 3.2.1 is out",
    ],
)
def test_years_amounts_and_order_numbers_near_phone_words_are_not_phones(text: str):
    assert "PHONE" not in kinds_of(text)


def test_a_year_or_a_price_is_not_a_phone():
    assert not scan("In 2019 the price rose from 1,250 to 1,900 euros, about 52% more.")


def test_credit_card_with_valid_luhn_is_found():
    assert luhn_valid("4539148803436467")
    assert texts_of("Charge my card 4539148803436467 for the room.", PiiKind.CREDIT_CARD) == ["4539148803436467"]


def test_card_shaped_number_failing_luhn_is_not_a_card():
    assert not luhn_valid("4539148803436468")
    assert "CREDIT_CARD" not in kinds_of("Order 4539148803436468 has shipped.")


def test_card_followed_by_its_cvv_is_found():
    assert texts_of("card 4539 1488 0343 6467 123", PiiKind.CREDIT_CARD) == ["4539 1488 0343 6467"]


def test_iban_is_found():
    assert texts_of("Überweisung an DE18 3704 0044 0532 0130 17 bitte.", PiiKind.IBAN) == [
        "DE18 3704 0044 0532 0130 17"
    ]


def test_iban_with_a_wrong_check_digit_is_not_found():
    assert "IBAN" not in kinds_of("IBAN: DE88 3704 0044 0532 0130 00")


def test_iban_running_into_the_next_word_keeps_its_own_length():
    assert texts_of("FR34 2004 1000 0005 0001 3M02 646 BIC PSSTFRPPXXX", PiiKind.IBAN) == [
        "FR34 2004 1000 0005 0001 3M02 646"
    ]


@pytest.mark.parametrize(
    "text, number",
    [
        ("SSN 536-22-8793 on file", "536-22-8793"),
        ("my social security number is 536228793", "536228793"),
        ("NI number: AB 12 34 56 C", "AB 12 34 56 C"),
        ("Steuer-ID: 65 929 970 489", "65 929 970 489"),
        ("Numéro de sécurité sociale 1 84 12 76 451 089 46", "1 84 12 76 451 089 46"),
        ("Mi DNI es 12345678Z", "12345678Z"),
        ("NIE X1234567L", "X1234567L"),
        ("Codice fiscale RSSMRA85T10A562S", "RSSMRA85T10A562S"),
        ("Mijn BSN is 111222333", "111222333"),
    ],
)
def test_national_ids_are_found(text: str, number: str):
    assert texts_of(text, PiiKind.NATIONAL_ID) == [number]


@pytest.mark.parametrize(
    "layout", ["{a}\n{b}\n{c}", "{a} / {b} / {c}", "{a}.{b}.{c}", "{a}  {b}  {c}", "[{a}][{b}][{c}]"]
)
def test_ssn_written_in_groups_after_its_cue_is_found(layout: str):
    fake = Faker("en_US")
    fake.seed_instance(3)
    for _ in range(20):
        ssn = fake.ssn().replace("-", "")
        written = layout.format(a=ssn[:3], b=ssn[3:5], c=ssn[5:])
        assert texts_of(f"SSN:\n{written}", PiiKind.NATIONAL_ID) == [written.strip("[]")]


def test_national_ids_with_unusual_separators_are_found():
    fakers = {loc: Faker(loc) for loc in ("fr_FR", "nl_NL", "es_ES", "it_IT", "zh_CN", "pt_BR", "pl_PL")}
    for i, faker in enumerate(fakers.values()):
        faker.seed_instance(i)
    for _ in range(15):
        nir = fakers["fr_FR"].ssn()
        bsn = fakers["nl_NL"].ssn()
        dni = fakers["es_ES"].nif()
        cf = fakers["it_IT"].ssn()
        cases = [
            ("", ".".join((nir[0], nir[1:3], nir[3:5], nir[5:7], nir[7:10], nir[10:13], nir[13:])), "written"),
            ("BSN ", f"{bsn[:4]}.{bsn[4:6]}.{bsn[6:]}", "written"),
            ("BSN ", f"{bsn[:3]}-{bsn[3:6]}-{bsn[6:]}", "written"),
            ("", f"{dni[:2]}.{dni[2:5]}.{dni[5:8]}-{dni[8]}", "written"),
            ("", f"{cf[:6]} {cf[6:11]} {cf[11:]}", "written"),
            ("codice fiscale: ", cf.lower(), "written"),
            ("身份证号码：", fakers["zh_CN"].ssn(), "CN"),
            ("CPF ", fakers["pt_BR"].cpf(), "written"),
            ("PESEL: ", fakers["pl_PL"].pesel(), "written"),
        ]
        for cue, written, _ in cases:
            if cue.startswith("身份证") and not cn_ric.is_valid(written):
                continue  # Faker draws birth-place codes stdnum does not list; the checksum rule accepts them
            assert "NATIONAL_ID" in kinds_of(f"Form: {cue}{written}"), (cue, written)


@pytest.mark.parametrize(
    "text, number",
    [
        ("Steuer-ID 65/929/970/489", "65/929/970/489"),
        ("National Insurance number AB-12-34-56-C", "AB-12-34-56-C"),
        ("NIE Y-1234567-X", "Y-1234567-X"),
    ],
)
def test_cued_ids_with_slashes_and_dashes_are_found(text: str, number: str):
    assert texts_of(text, PiiKind.NATIONAL_ID) == [number]


def test_a_cued_number_failing_its_checksum_is_not_an_id():
    assert "NATIONAL_ID" not in kinds_of("Steuer-ID: 12/345/678/901, BSN 123.45.678")


def test_nine_digits_without_a_cue_are_not_a_bsn_or_ssn():
    assert "NATIONAL_ID" not in kinds_of("The batch id is 111222333.")


def test_ssn_in_an_invalid_range_is_not_found():
    assert "NATIONAL_ID" not in kinds_of("SSN 000-12-3456")


@pytest.mark.parametrize(
    "text, number",
    [
        ("My passport number is 912803456.", "912803456"),
        ("Reisepass-Nr. C01X00T47", "C01X00T47"),
        ("numéro de passeport : 12AB34567", "12AB34567"),
        ("pasaporte PAA123456", "PAA123456"),
    ],
)
def test_passport_numbers_after_a_cue_are_found(text: str, number: str):
    assert texts_of(text, PiiKind.PASSPORT) == [number]


def test_passport_shaped_number_without_a_cue_is_not_a_passport():
    assert "PASSPORT" not in kinds_of("Ticket C01X00T47 was closed.")


@pytest.mark.parametrize(
    "text, date",
    [
        ("I was born on 3 May 1985 in Leeds.", "3 May 1985"),
        ("DOB: 1985-05-03", "1985-05-03"),
        ("Date of birth 05/03/1985", "05/03/1985"),
        ("born March 4, 1990", "March 4, 1990"),
        ("Ich bin am 3. Mai 1985 geboren", "3. Mai 1985"),
        ("I was born in 1985 in Leeds.", None),
        ("geboren am 3. Mai 1985", "3. Mai 1985"),
        ("née le 14 juillet 1972", "14 juillet 1972"),
        ("fecha de nacimiento: 3 de mayo de 1985", "3 de mayo de 1985"),
    ],
)
def test_date_of_birth_needs_a_birth_cue(text: str, date: str | None):
    assert texts_of(text, PiiKind.DATE_OF_BIRTH) == ([date] if date else [])


@pytest.mark.parametrize(
    "text, date",
    [
        ("生年月日: 1979年11月2日", "1979年11月2日"),
        ("1990年7月15日生まれ", "1990年7月15日"),
        ("출생: 생년월일 1988년 2월 29일", "1988년 2월 29일"),
        ("дата рождения 5 марта 1961", "5 марта 1961"),
        ("Patient DOB: 14-Feb-1958", "14-Feb-1958"),
        ("Date of birth:\n02 / 11 / 1970", "02 / 11 / 1970"),
        ("nacido el 9 de octubre del 1999", "9 de octubre del 1999"),
        ("DOB 19711203", "19711203"),
    ],
)
def test_dates_of_birth_in_more_formats_and_languages(text: str, date: str):
    assert texts_of(text, PiiKind.DATE_OF_BIRTH) == [date]


def test_a_date_without_a_birth_cue_is_not_pii():
    assert not scan("The release on 2024-05-03 moved the launch to 3 May 2024.")


@pytest.mark.parametrize(
    "secret",
    [
        "sk-proj-" + "a1B2c3D4e5" * 4,
        "AKIA2OGYBAH6QJTM4XZP",
        "ghp_" + "x9Y8z7W6v5" * 4,
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    ],
)
def test_prefixed_api_keys_are_credentials(secret: str):
    assert texts_of(f"Why does this key fail: {secret} ?", PiiKind.CREDENTIAL) == [secret]


def test_private_key_block_is_one_credential():
    block = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----"
    assert texts_of(f"my key:\n{block}\nthanks", PiiKind.CREDENTIAL) == [block]


def test_truncated_private_key_block_is_a_credential_to_the_end():
    assert texts_of("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0", PiiKind.CREDENTIAL)


@pytest.mark.parametrize(
    "text, value",
    [
        ("password: hunter2", "hunter2"),
        ("DB_PASSWORD='S3cr3t!'", "'S3cr3t!'"),
        ("Mein Passwort ist Sommer2024!", "Sommer2024!"),
        ("Authorization: Bearer abcDEF123456ghiJKL789", "abcDEF123456ghiJKL789"),
        ("postgres://app:pa55word@db.internal:5432/app", "pa55word"),
    ],
)
def test_passwords_and_tokens_are_credentials(text: str, value: str):
    assert texts_of(text, PiiKind.CREDENTIAL) == [value]


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "text, value",
    [
        (f"curl -H 'Authorization: Basic {_basic('ops', 'Tr1cky-pass')}' https://x", _basic("ops", "Tr1cky-pass")),
        ("Authorization: Token 9f86d081884c7d659a2feaa0c55ad015", "9f86d081884c7d659a2feaa0c55ad015"),
        ("X-API-Key: 4fG7hK9mQ2wE5rT8yU1iO3pA", "4fG7hK9mQ2wE5rT8yU1iO3pA"),
        ("jdbc:postgresql://db/app?user=svc&password=Xy7-Qq!9", "Xy7-Qq!9"),
        ("Server=db;User Id=sa;Pwd=Winter#2024;", "Winter#2024"),
        ("curl -u deploy:G00dP4ss https://ci.internal", "G00dP4ss"),
        ("the aws secret is k8Jd2LqP0vXz/9RtY3mN7bWc4HsA1eFgU6oIiZxQ", "k8Jd2LqP0vXz/9RtY3mN7bWc4HsA1eFgU6oIiZxQ"),
        ("signing key for staging: kQ9vX2mN8pL4tR7wZ1bC5dF3", "kQ9vX2mN8pL4tR7wZ1bC5dF3"),
        ("パスワードは Sakura2024! です", "Sakura2024!"),
        ("SLACK_HOOK=https://hooks.slack.com/services/T0001/B0002/AbCdEfGhIjKlMnOp", None),
    ],
)
def test_credentials_in_headers_and_config_are_found(text: str, value: str | None):
    found = texts_of(text, PiiKind.CREDENTIAL)
    assert found == [value] if value else found


@pytest.mark.parametrize(
    "text",
    [
        "We need basic authentication on the admin pages.",
        "Authorization: Basic <base64 credentials>",
        "The primary key getUserAccessTokenByIdentifier is indexed.",
        "Put the key in /usr/local/etc/app/config.yaml",
        "The token expires after 3600 seconds.",
    ],
)
def test_key_words_without_a_generated_value_are_not_credentials(text: str):
    assert "CREDENTIAL" not in kinds_of(text)


@pytest.mark.parametrize(
    "text",
    [
        "password: ********",
        "Set api_key=YOUR_API_KEY in the config.",
        "The password is incorrect, try again.",
        "password: <your password>",
        "token = get_token()",
        "docker run -e POSTGRES_PASSWORD=example postgres:16",
    ],
)
def test_placeholders_and_prose_are_not_credentials(text: str):
    assert "CREDENTIAL" not in kinds_of(text)


@pytest.mark.parametrize(
    "address", ["81.206.130.46", "185.12.64.3", "2a00:1450:4001:82b::200e", "2606:4700:10::6816:1a3f"]
)
def test_ip_addresses_are_found(address: str):
    assert texts_of(f"Logins from {address} failed.", PiiKind.IP_ADDRESS) == [address]


@pytest.mark.parametrize(
    "text", ["Bind to 127.0.0.1:8000", "listen on 0.0.0.0", "999.10.10.10 is not valid", "at 12:30:45"]
)
def test_loopback_unspecified_and_invalid_addresses_are_not_found(text: str):
    assert "IP_ADDRESS" not in kinds_of(text)


@pytest.mark.parametrize(
    "text, name",
    [
        ("My name is Laura Fischer and I need a lawyer.", "Laura Fischer"),
        ("Dear Mr. Okonkwo,\nyour appointment is confirmed.", "Okonkwo"),
        ("Patient Jan de Vries presented with a fever.", "Jan de Vries"),
        ("Kind regards,\nSophie Martin", "Sophie Martin"),
    ],
)
def test_person_names_are_found(text: str, name: str):
    assert texts_of(text, PiiKind.PERSON) == [name]


@pytest.mark.parametrize(
    "text, name",
    [
        ("hi, my name is laura fischer and i need help", "laura fischer"),
        ("NAME: LAURA FISCHER\nDEPT: HR", "LAURA FISCHER"),
        ("see you monday\nregards,\nPIETER DE GROOT", "PIETER DE GROOT"),
        ("田中太郎と申します。", "田中太郎"),
        ("我叫王伟，在上海工作。", "王伟"),
        ("제 이름은 김민준입니다.", "김민준"),
        ("Здравствуйте, меня зовут Иван Петров.", "Иван Петров"),
    ],
)
def test_cased_and_non_latin_names_after_a_cue_are_found(text: str, name: str):
    assert texts_of(text, PiiKind.PERSON) == [name]


@pytest.mark.parametrize("locale", ["ja_JP", "zh_CN", "ko_KR", "ru_RU", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL"])
def test_generated_names_after_their_languages_cue_are_found(locale: str):
    templates = {
        "ja_JP": "私の名前は{}です。",
        "zh_CN": "我的名字是{}。",
        "ko_KR": "이름: {}",
        "ru_RU": "Меня зовут {}.",
    }
    fake = Faker(locale)
    fake.seed_instance(11)
    for _ in range(20):
        if locale in templates:
            name = fake.last_name() + ("" if locale != "ru_RU" else " ") + fake.first_name()
            text = templates[locale].format(name)
        else:
            name = f"{fake.first_name()} {fake.last_name()}".lower()
            text = f"hello, my name is {name}"
        assert any(name in found or found in name for found in texts_of(text, PiiKind.PERSON)), text


@pytest.mark.parametrize(
    "text",
    [
        "my name is not important here",
        "name: build-and-test\nruns-on: ubuntu-latest",
        "Thanks,\nthe team",
        "меня зовут к телефону",
        "私の名前はまだありません。",
    ],
)
def test_name_cues_without_a_name_are_not_pii(text: str):
    assert "PERSON" not in kinds_of(text)


def test_capitalised_product_and_sentence_openers_are_not_names():
    text = "Latency fell after we moved the service to Kubernetes. Next steps: review the PostgreSQL pool."
    assert "PERSON" not in kinds_of(text)


def test_capitals_inside_codes_and_timestamps_are_not_initials():
    assert not scan('{"created": "2024-05-03T12:30:45Z", "tracking": "1Z999AA10123456784"}')


# the public-figure rule ---------------------------------------------------------------------------------


def test_public_figure_in_a_public_role_is_not_pii():
    assert not scan("What did Barack Obama say in his 2009 inaugural address?")


def test_public_figure_surname_alone_is_not_pii():
    assert not scan("Why did Merkel open the borders in 2015?")


def test_public_figure_with_personal_details_is_pii():
    report = scan("Barack Obama's personal email is barack.private@gmail.com")
    assert report.kinds == {"PERSON", "EMAIL"}


def test_private_person_with_personal_details_is_pii():
    report = scan("Please email Gerda Vollmer at gerda.vollmer@web.de about her rent.")
    assert report.kinds == {"PERSON", "EMAIL"}


def test_fragment_of_a_listed_full_name_is_not_pii():
    assert not scan("Summarise what Carl Friedrich Gauss proved about prime numbers.")


# names that are no person where they stand (non_names.py) -----------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Why is Stokes' theorem a generalisation of Green's theorem?",
        "Write a proof sketch for Kirchhoff's voltage law.",
        "Erkläre den Satz von Euler für Polyeder.",
        "¿Para qué sirve la ley de Hooke en ingeniería?",
        "Implement the Levenshtein distance in Go.",
    ],
)
def test_name_inside_a_law_or_theorem_is_not_pii(text: str) -> None:
    assert not scan(text)


@pytest.mark.parametrize("text", ["O", "Die Antwort ist falsch.", "Let B be a bounded set."])
def test_lone_letters_and_function_words_are_not_names(text: str) -> None:
    assert not scan(text)


def test_initial_inside_a_name_is_kept():
    assert texts_of("Notes from the call with Serda O. Demir.", PiiKind.PERSON)


@pytest.mark.parametrize(
    "text",
    [
        "Bob signs the message with his private key and Alice verifies it. Which key does she use?",
        "The registration form should show Max Mustermann as the example entry.",
        "Is John Doe a good placeholder in our API docs?",
    ],
)
def test_example_names_in_a_teaching_question_are_not_pii(text: str) -> None:
    assert not scan(text)


def test_example_name_without_a_teaching_context_is_still_a_name():
    assert texts_of("Remind Alice about the dentist on Tuesday.", PiiKind.PERSON)


def test_example_name_with_personal_details_is_pii():
    report = scan("Alice's new mobile is +44 7700 900461, please save it.")
    assert report.kinds == {"PERSON", "PHONE"}


@pytest.mark.parametrize(
    "text",
    ["What is the cheapest way from Lisbon to Florence?", "Je pars à Virginia en mai.", "Is Heidelberg walkable?"],
)
def test_places_are_not_names(text: str) -> None:
    assert not scan(text)


def test_first_name_that_is_also_a_place_is_a_name_without_a_place_cue():
    assert texts_of("Florence called about the invoice yesterday.", PiiKind.PERSON)


def test_product_that_is_a_first_name_is_no_person_in_a_software_question():
    assert not scan("Julia throws an error after the update to 1.10.")


# lone capitalised words (lone_words.py) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Die Stadtbibliothek hat am Montag zu. Kannst du den Rundbrief kürzen?",
        "Bitte prüfe, ob die Nebenkostenabrechung vollständig ist.",
        "Die Mitgliieder sollen bis Freitag zahlen.",
        "Der Erlös geht an die Schule.",
        "Kun je de Jaarverslag vertalen naar het Engels?",
    ],
)
def test_german_and_dutch_nouns_are_not_names(text: str) -> None:
    assert not scan(text)


def test_german_prompt_keeps_a_first_name_and_a_greeted_name():
    assert texts_of("Kannst du Anna fragen, ob die Abrechnung fertig ist?", PiiKind.PERSON) == ["Anna"]
    assert texts_of("Liebe Zeynep, die Abrechnung ist fertig.", PiiKind.PERSON) == ["Zeynep"]


@pytest.mark.parametrize(
    "text",
    ["Im August ist das Büro zu.", "We are closed in April.", "Quels sont les horaires en Juillet ?",
     "Joyeux Noël à toute l'équipe !", "Plan the offsite for Easter."],
)  # fmt: skip
def test_months_weekdays_and_holidays_are_not_names(text: str) -> None:
    assert not scan(text)


def test_month_name_with_a_surname_is_still_a_name():
    assert texts_of("April Kepner called about the invoice.", PiiKind.PERSON)


@pytest.mark.parametrize(
    "text",
    ["Water boils faster at altitude. Why?", "Edit: fixed the typo.\nSmall question: why is this slow?",
     "Is SaaS cheaper than running our own servers?", "Das ist z. B. ein gutes Beispiel.",
     "Siehe Abschnitt K. Dort steht die Vorlage.", "We spent the holidays in Ruzafa."],
)  # fmt: skip
def test_sentence_openers_acronyms_letters_and_places_are_not_names(text: str) -> None:
    assert not scan(text)


def test_name_particle_is_not_read_as_an_article():
    assert texts_of("Prof. van der Brink moved the exam.", PiiKind.PERSON)
    assert texts_of("Hello, I am Dean der Kijnder, and I need help.", PiiKind.PERSON)


def test_bare_unknown_name_in_a_german_prompt_is_still_a_name():
    # German nouns carry a determiner, a noun suffix or a compound's length; a bare name has none of these.
    assert texts_of("Ich habe mit Jukka gesprochen, er kommt morgen.", PiiKind.PERSON) == ["Jukka"]


# credentials in code -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "def sign(secret, payload):\n    return {'signature': mac(secret), 'client_secret': secret}",
        "config = {'token': token, 'password': password, 'api_key': api_key}",
        "client = Client(api_key=self.api_key, secret=settings.secret)",
        "const opts = { password: opts.password, token: authToken };",
    ],
)
def test_secret_variable_names_in_code_are_not_credentials(text: str) -> None:
    assert "CREDENTIAL" not in kinds_of(text)


def test_secret_value_in_the_same_code_is_still_a_credential():
    text = "config = {'client_secret': secret}\nsecret = 'Zr8u2mQx!pL4'\npassword = hunter2"
    assert texts_of(text, PiiKind.CREDENTIAL) == ["'Zr8u2mQx!pL4'", "hunter2"]


# look-alikes -----------------------------------------------------------------------------------------


def test_well_known_test_card_in_a_testing_question_is_not_pii():
    assert not scan("Stripe test card 4242 4242 4242 4242 is declined in my sandbox, why?")


def test_well_known_test_card_is_not_pii_even_without_testing_context():
    # Published test numbers are accepted by test systems only and issued to no one.
    assert not scan("Please charge 4111111111111111, exp 04/27, for my order.")


def test_real_card_next_to_a_test_card_is_still_a_card():
    text = "Checkout works with 4242 4242 4242 4242 but my own card 4539 1488 0343 6467 is declined."
    assert texts_of(text, PiiKind.CREDIT_CARD) == ["4539 1488 0343 6467"]


# documentation values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["192.0.2.17", "198.51.100.23", "203.0.113.250", "10.0.0.12", "172.16.5.4", "192.168.1.10", "169.254.10.1",
     "100.64.3.2", "224.0.0.251", "2001:db8:85a3::8a2e:370:7334", "fe80::1ff:fe23:4567:890a", "fd00::1", "::1"],
)  # fmt: skip
def test_reserved_and_private_ip_addresses_are_not_pii(address: str):
    assert not scan(f"Logins from {address} failed.")


@pytest.mark.parametrize("network", ["10.0.0.0/22", "81.206.128.0/20", "198.51.100.0/24", "2a00:1450::/32"])
def test_network_written_with_a_prefix_is_not_an_ip_address(network: str):
    assert not scan(f"Allow {network} in the security group.")


def test_public_host_next_to_a_network_is_still_an_ip_address():
    text = "Allow 81.206.128.0/20; the scans came from 81.206.130.46 and my router is 81.206.131.7/24."
    assert texts_of(text, PiiKind.IP_ADDRESS) == ["81.206.130.46", "81.206.131.7"]


def test_vendor_example_keys_are_not_credentials():
    text = "The AWS docs use AKIAIOSFODNN7EXAMPLE and secret key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY."
    assert not scan(text)


def test_real_key_next_to_an_example_key_is_still_a_credential():
    text = "Not AKIAIOSFODNN7EXAMPLE: ours is AKIA2OGYBAH6QJTM4XZP, please rotate it."
    assert texts_of(text, PiiKind.CREDENTIAL) == ["AKIA2OGYBAH6QJTM4XZP"]


def test_the_standards_example_ibans_are_not_pii():
    assert not scan("Explain the check digits of DE89 3704 0044 0532 0130 00 and GB82 WEST 1234 5698 7654 32.")


def test_real_iban_next_to_the_example_iban_is_still_an_iban():
    text = "Like DE89 3704 0044 0532 0130 00, mine is DE18 3704 0044 0532 0130 17."
    assert texts_of(text, PiiKind.IBAN) == ["DE18 3704 0044 0532 0130 17"]


@pytest.mark.parametrize("ssn", ["078-05-1120", "000-12-3456", "666-45-6789", "912-34-5678", "123-00-4567"])
def test_ssns_that_are_never_issued_are_not_pii(ssn: str):
    assert not scan(f"Is SSN {ssn} a valid format for my form validator?")


def test_issuable_ssn_next_to_the_voided_one_is_still_found():
    text = "Not 078-05-1120, my SSN is 536-22-8793."
    assert texts_of(text, PiiKind.NATIONAL_ID) == ["536-22-8793"]


def test_fictional_characters_are_not_pii():
    assert not scan("Write a scene where Sherlock Holmes and Dr Watson meet Hercule Poirot.")


def test_fictional_character_next_to_a_real_person_keeps_the_person():
    assert "PERSON" in kinds_of("Sherlock Holmes fans: Lena Vogt (lena.vogt@posteo.de) runs our club.")


# obfuscations --------------------------------------------------------------------------------------------


def test_spelled_out_email_is_found_at_its_original_span():
    text = "write to john dot doe at posteo dot de today"
    assert texts_of(text, PiiKind.EMAIL) == ["john dot doe at posteo dot de"]


def test_bracketed_email_is_found():
    assert texts_of("mail: john [at] posteo [dot] de", PiiKind.EMAIL) == ["john [at] posteo [dot] de"]


def test_plain_at_between_words_is_not_an_email():
    assert "EMAIL" not in kinds_of("Look at the example and tell me what the dot product is.")


@pytest.mark.parametrize(
    "written",
    ["4539 1488 0343 6467", "4539-1488-0343-6467", "4 5 3 9 1 4 8 8 0 3 4 3 6 4 6 7", "4539 1488\n0343 6467"],
)
def test_spaced_dashed_and_wrapped_card_numbers_are_found(written: str):
    assert texts_of(f"my card: {written} thanks", PiiKind.CREDIT_CARD) == [written]


def test_spelled_out_card_number_is_found():
    digits = " ".join(["four", "five", "three", "nine", "one", "four", "eight", "eight"])
    digits += " " + " ".join(["zero", "three", "four", "three", "six", "four", "six", "seven"])
    assert texts_of(f"the card is {digits}.", PiiKind.CREDIT_CARD) == [digits]


def test_spelled_out_phone_number_is_found():
    text = "my number is five five five, one two three four"
    assert texts_of(text, PiiKind.PHONE) == ["five five five, one two three four"]


def test_iban_split_over_lines_is_found():
    assert texts_of("IBAN: DE18 3704 0044\n0532 0130 17", PiiKind.IBAN) == ["DE18 3704 0044\n0532 0130 17"]


def test_a_few_number_words_are_not_obfuscated_digits():
    assert not scan("I have one or two questions about three of the four options.")


@pytest.mark.parametrize(
    ("text", "spelled"),
    [
        ("mi correo es juan.perez arroba gmail punto com", "juan.perez arroba gmail punto com"),
        ("e-mail: ana ponto souza arroba uol ponto com ponto br", "ana ponto souza arroba uol ponto com ponto br"),
        ("écris à jean point dupont arobase orange point fr", "jean point dupont arobase orange point fr"),
        ("Mail an max punkt mustermann at gmx punkt de bitte", "max punkt mustermann at gmx punkt de"),
        ("Mail an max.mustermann Klammeraffe web.de", "max.mustermann Klammeraffe web.de"),
        ("scrivi a mario punto rossi chiocciola libero punto it", "mario punto rossi chiocciola libero punto it"),
        ("mail naar jan punt jansen apenstaartje ziggo punt nl", "jan punt jansen apenstaartje ziggo punt nl"),
        ("contact: john(at)webmail(dot)com", "john(at)webmail(dot)com"),
        ("contact: john {at} webmail {dot} org", "john {at} webmail {dot} org"),
        ("contact: jane.doe <at> mail.webmail.net", "jane.doe <at> mail.webmail.net"),
        ("contact: jane AT webmail DOT com", "jane AT webmail DOT com"),
    ],
)
def test_email_words_of_other_languages_and_brackets_are_found(text: str, spelled: str):
    assert texts_of(text, PiiKind.EMAIL) == [spelled]


@pytest.mark.parametrize(
    ("text", "spelled"),
    [
        ("Mon portable : zéro six, cinquante et un, quatre-vingt-quinze, douze, trente-quatre.",
         "zéro six, cinquante et un, quatre-vingt-quinze, douze, trente-quatre"),
        ("Mon numéro : zéro six soixante et onze quatre-vingts dix-neuf soixante-dix-sept",
         "zéro six soixante et onze quatre-vingts dix-neuf soixante-dix-sept"),
        ("Handy: plus vier neun, eins sechs null, drei neun sieben fünf, eins zwo drei vier",
         "plus vier neun, eins sechs null, drei neun sieben fünf, eins zwo drei vier"),
        ("Ruf mich an: null eins sieben eins, zweiundzwanzig, vierunddreißig, sechsundfünfzig, doppel acht",
         "null eins sieben eins, zweiundzwanzig, vierunddreißig, sechsundfünfzig, doppel acht"),
        ("Mi teléfono es seis uno dos, treinta y cuatro, cincuenta y seis, setenta y ocho.",
         "seis uno dos, treinta y cuatro, cincuenta y seis, setenta y ocho"),
        ("Il mio numero è tre quattro sette, ventotto, novantuno, quarantacinque.",
         "tre quattro sette, ventotto, novantuno, quarantacinque"),
        ("Mijn nummer is nul zes, twaalf, vierendertig, zesenvijftig, achtenzeventig.",
         "nul zes, twaalf, vierendertig, zesenvijftig, achtenzeventig"),
        ("Meu telefone: (11) nove meia dois três quatro, cinco seis sete oito",
         "(11) nove meia dois três quatro, cinco seis sete oito"),
        ("mon portable: 06 cinquante et un 95 douze 34", "06 cinquante et un 95 douze 34"),
        ("my mobile is oh seven nine double one, one two three, four five six", "oh seven nine double one, one two three, four five six"),
    ],
)  # fmt: skip
def test_phone_numbers_spelled_out_in_other_languages_are_found(text: str, spelled: str):
    assert texts_of(text, PiiKind.PHONE) == [spelled]


@pytest.mark.parametrize(
    ("words", "digits"),
    [
        ("soixante et onze", "71"),
        ("quatre-vingts", "80"),
        ("quatre-vingt-dix-neuf", "99"),
        ("soixante-dix-sept", "77"),
        ("cent quatre-vingt-un", "181"),
        ("einundzwanzig", "21"),
        ("zwoundneunzig", "92"),
        ("hundertsechzig", "160"),
        ("veintidós", "22"),
        ("ciento veinte", "120"),
        ("ventotto", "28"),
        ("centotré", "103"),
        ("tweeëntwintig", "22"),
        ("honderdéén", "101"),
        ("trezentos e quarenta e cinco", "345"),
        ("ninety-nine", "99"),
    ],
)
def test_compound_number_words_read_as_one_number(words: str, digits: str):
    assert normalise(f"zero, {words}, 12345").text == f"0 {digits} 12345"


@pytest.mark.parametrize(
    "text",
    [
        "Das kostet neunundneunzig Euro und neunundneunzig Cent, also fast hundert Euro.",
        "Zähl mit: eins, zwei, drei, vier, fünf, sechs, sieben, acht, neun, zehn!",
        "Punkt eins der Tagesordnung: wir treffen uns um Punkt acht Uhr at the office. Punkt zwei: das Budget.",
        "Il faut quatre-vingt-dix grammes de beurre, deux œufs et trois cent cinquante grammes de farine.",
        "Le vingt-cinq décembre deux mille vingt-quatre, nous étions soixante-dix à table.",
        "El punto de encuentro es la plaza mayor; compré doce huevos y tres kilos de patatas.",
        "La chiocciola è lenta: percorre cinquanta centimetri in venti minuti.",
        "The point at issue is the dot product at scale, not the cross product.",
        "Add one cup of flour, two eggs, three hundred grams of sugar and four tablespoons of milk.",
        "values = [null, null, null, 0, 0, 12]  # null null null means missing",
        "We need double five batteries, triple A, and one two-pack of cables.",
    ],
)
def test_number_words_and_at_point_words_in_prose_are_not_pii(text: str):
    assert not kinds_of(text) & {"EMAIL", "PHONE", "NATIONAL_ID", "CREDIT_CARD", "IBAN"}


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("my SSN, the form split it into three boxes: 471 32 6736", "471 32 6736"),
        ("For the social security number field, which the portal kept rejecting yesterday, I entered 536 22 8793",
         "536 22 8793"),
        ("Meine Steuer-ID steht oben rechts auf dem letzten Bescheid vom Finanzamt und lautet 86 095 742 719.",
         "86 095 742 719"),
        ("my ssn, in case the insurer asks again, is five three six, two two, eight seven nine three",
         "five three six, two two, eight seven nine three"),
    ],
)  # fmt: skip
def test_ids_a_clause_after_their_cue_are_found(text: str, number: str):
    assert texts_of(text, PiiKind.NATIONAL_ID) == [number]


def test_an_id_after_a_blank_line_is_not_tied_to_the_cue_before_it():
    assert "NATIONAL_ID" not in kinds_of("Where do I find my SSN?\n\nThe parcel 536228793 arrives today.")


@pytest.mark.parametrize("category", ["spelled phone", "worded email", "gapped id"])
def test_generated_obfuscations_in_every_language_are_found(category: str):
    positives, _ = obfuscation_examples(seed=11, per_category=60)
    missed = [
        e.text
        for e in positives
        if e.gold[0].variant.startswith(category)
        and not any(f.start < e.gold[0].end and e.gold[0].start < f.end for f in scan(e.text).findings)
    ]
    assert missed == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Block 81[.]206[.]130[.]46 now", "81[.]206[.]130[.]46"),
        ("Block 81(.)206(.)130(.)46 now", "81(.)206(.)130(.)46"),
        ("Block 81{.}206{.}130{.}46 now", "81{.}206{.}130{.}46"),
        ("Block 81[dot]206[dot]130[dot]46 now", "81[dot]206[dot]130[dot]46"),
    ],
)
def test_defanged_ip_address_is_found(text: str, value: str):
    assert texts_of(text, PiiKind.IP_ADDRESS) == [value]


@pytest.mark.parametrize(
    "value", ["lena.vogt[at]posteo[dot]de", "lena.vogt@posteo[.]de", "lena[.]vogt[@]posteo[.]de", "lena(@)posteo(.)de"]
)
def test_defanged_email_is_found(value: str):
    assert texts_of(f"The phishing mail came from {value} today.", PiiKind.EMAIL) == [value]


def test_defanged_documentation_values_and_versions_stay_clean():
    assert not scan("Section 4(.)2: the template shows host[.]example and 192[.]0[.]2[.]1; use 3[.]11.")


# non-English prompts ---------------------------------------------------------------------------------------


def test_german_prompt_with_contact_details():
    text = "Hallo, ich bin Jürgen Weiß, Handy 0171 2345678, IBAN DE18370400440532013017."
    assert kinds_of(text) == {"PERSON", "PHONE", "IBAN"}


def test_french_prompt_with_social_security_number():
    text = "Bonjour, voici mon numéro de sécurité sociale : 2 85 07 75 123 456 55 et mon tél. 06 12 34 56 78."
    assert kinds_of(text) == {"NATIONAL_ID", "PHONE"}


def test_spanish_prompt_with_dni_and_phone():
    text = "Hola, mi DNI es 12345678Z y mi móvil es 612 345 678."
    assert kinds_of(text) == {"NATIONAL_ID", "PHONE"}


# redaction ---------------------------------------------------------------------------------------------


def test_redact_replaces_findings_with_numbered_placeholders():
    redaction = redact("Mail anna.berg@mailbox.org and ben.ott@mailbox.org, or call +44 20 7946 0958.")
    assert redaction.text == "Mail <EMAIL_1> and <EMAIL_2>, or call <PHONE_1>."
    assert redaction.mapping == {
        "<EMAIL_1>": "anna.berg@mailbox.org",
        "<EMAIL_2>": "ben.ott@mailbox.org",
        "<PHONE_1>": "+44 20 7946 0958",
    }


def test_redact_gives_a_repeated_value_the_same_placeholder():
    redaction = redact("anna.berg@mailbox.org wrote; reply to anna.berg@mailbox.org")
    assert redaction.text == "<EMAIL_1> wrote; reply to <EMAIL_1>"


def test_redact_skips_placeholder_numbers_the_text_already_uses():
    redaction = redact("Template uses <EMAIL_1>; my address is anna.berg@mailbox.org")
    assert redaction.text == "Template uses <EMAIL_1>; my address is <EMAIL_2>"
    assert redaction.restore(redaction.text) == "Template uses <EMAIL_1>; my address is anna.berg@mailbox.org"


def test_redact_uses_a_given_report():
    text = "call +44 20 7946 0958"
    assert redact(text, PiiReport()).text == text
    assert redact(text, scan(text)).text == "call <PHONE_1>"


def test_restore_round_trips_the_redacted_text():
    text = "I'm Laura Fischer, card 4539 1488 0343 6467, mail laura@fischer.de, IBAN DE18370400440532013017."
    redaction = redact(text)
    assert "Laura" not in redaction.text and "4539" not in redaction.text
    assert redaction.restore(redaction.text) == text


def test_restore_puts_originals_into_a_reply_and_leaves_unknown_placeholders():
    redaction = redact("My email is anna.berg@mailbox.org")
    reply = "I will write to <EMAIL_1> and cc <EMAIL_9>."
    assert redaction.restore(reply) == "I will write to anna.berg@mailbox.org and cc <EMAIL_9>."


def _stream(redaction: Redaction, chunks: list[str]) -> str:
    restorer = StreamRestorer(redaction)
    return "".join(restorer.push(chunk) for chunk in chunks) + restorer.flush()


def test_stream_restorer_handles_a_placeholder_split_at_every_position():
    redaction = Redaction("", {"<EMAIL_1>": "anna@x.de"})
    reply = "Mail <EMAIL_1> now"
    for cut in range(len(reply) + 1):
        assert _stream(redaction, [reply[:cut], reply[cut:]]) == "Mail anna@x.de now"


def test_stream_restorer_holds_back_only_a_possible_placeholder():
    restorer = StreamRestorer(Redaction("", {"<EMAIL_1>": "anna@x.de"}))
    assert restorer.push("Write to <EMA") == "Write to "
    assert restorer.push("IL_1> or <b>") == "anna@x.de or <b>"
    assert restorer.push("x < y") == "x < y"
    assert restorer.flush() == ""


def test_stream_restorer_flushes_an_unfinished_placeholder_verbatim():
    restorer = StreamRestorer(Redaction("", {"<PHONE_1>": "+44 20 7946 0958"}))
    assert restorer.push("call <PHO") == "call "
    assert restorer.flush() == "<PHO"


_PLACEHOLDERS = {"<EMAIL_1>": "a@b.de", "<EMAIL_12>": "c@d.de", "<PERSON_1>": "Ann Lee", "<PHONE_3>": "+1 415 555 0132"}
_pieces = st.sampled_from([*_PLACEHOLDERS, "<", ">", "<EMA", "IL_1", "_1>", "x", " ", "ü", "<<", "<b>", "PHONE_"])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_pieces, max_size=30), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_stream_restorer_output_equals_restore_however_the_stream_is_split(pieces: list[str], cuts: list[int]):
    redaction = Redaction("", _PLACEHOLDERS)
    reply = "".join(pieces)
    bounds = sorted({min(c, len(reply)) for c in cuts} | {0, len(reply)})
    chunks = [reply[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert _stream(redaction, chunks) == redaction.restore(reply)


# the normaliser's offset map --------------------------------------------------------------------------------

_fragments = st.sampled_from(
    [
        "john",
        " dot ",
        " at ",
        "example",
        " [at] ",
        "(dot)",
        "com",
        "one",
        "five",
        "nine",
        ", ",
        "-",
        "\n",
        " ",
        "x",
        "7",
        " arroba ",
        " punto ",
        "[dot]",
        "quatre",
        "-vingt",
        " et ",
        "un",
        "plus ",
        "double ",
        "einundzwanzig",
        "zwei",
    ]
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_fragments, max_size=40))
def test_normaliser_maps_every_copied_character_back_inside_the_original(parts: list[str]):
    text = "".join(parts)
    normalised = normalise(text)
    if not normalised.changed:
        assert normalised.text == text
        return
    assert len(normalised.starts) == len(normalised.ends) == len(normalised.text)
    for i, char in enumerate(normalised.text):
        start, end = normalised.original_span(i, i + 1)
        assert 0 <= start < end <= len(text)
        if end - start == 1 and text[start] == char:
            continue  # kept as is
        assert char in "0123456789@. +"  # otherwise a replacement made from text[start:end]
    assert list(normalised.starts) == sorted(normalised.starts)


@settings(max_examples=200, deadline=None)
@given(before=st.text(alphabet="abc ,.", max_size=20), after=st.text(alphabet="abc ,.", max_size=20))
def test_normalised_email_maps_back_to_exactly_the_spelled_out_text(before: str, after: str):
    spelled = "john dot doe at example dot com"
    text = f"{before} {spelled} {after}"
    normalised = normalise(text)
    at = normalised.text.index("john.doe@example.com")
    start, end = normalised.original_span(at, at + len("john.doe@example.com"))
    assert text[start:end] == spelled


# adversarial input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1" * 20_000 + "x",
        "1 " * 10_000,
        "dot " + "a." * 10_000,
        "a dot " * 4_000 + "b",
        "one" + " " * 5_000 + "two three",
        "a@" + "b." * 10_000,
        "x at " * 4_000,
        "SSN " + "1 " * 10_000,
        "ssn bsn nie cf " * 2_000,
        "Authorization: Basic " + "QUJD" * 5_000,
        "secret key " * 2_000 + "aB3" * 5_000,
        "phone " + "0-" * 10_000,
        "my name is " + "john " * 5_000,
        "Regards,\n" * 5_000,
        "我叫" * 5_000 + "王" * 5_000,
        "DOB " + "1 / " * 5_000,
        "geboren " * 3_000 + "12." * 3_000,
        "a arroba " * 4_000 + "b",
        "x punkt " * 5_000,
        "a (at) " * 4_000,
        "a" + " " * 5_000 + "at b.com",
        "eins " * 10_000,
        "vingt-" * 5_000,
        "plus double " * 5_000,
        "deux et " * 5_000,
        "SSN " + "x " * 10_000,
        "my colleague " * 4_000 + "Anna",
        "password for the " * 3_000 + "is x1",
        "メールは" * 3_000 + "a@b.com",
    ],
    ids=[
        "digits-then-letter",
        "spaced-digits",
        "dotted-atoms",
        "spelled-dots",
        "long-spaces",
        "labels",
        "ats",
        "cued-spaced-digits",
        "many-id-cues",
        "long-basic",
        "key-words-entropy",
        "trunk-dashes",
        "long-name",
        "sign-offs",
        "zh-cues",
        "dob-separators",
        "suffix-cues",
        "arroba-chain",
        "punkt-chain",
        "bracket-ats",
        "spaces-before-at",
        "digit-words",
        "vingt-chain",
        "plus-double",
        "joiners",
        "ssn-then-words",
        "relative-chain",
        "password-qualifiers",
        "cjk-before-email",
    ],  # fmt: skip
)
def test_pathological_input_is_scanned_in_linear_time(text: str):
    # Not a speed benchmark: a guard against catastrophic backtracking, which took 50 s on the first case
    # before the digit pattern was made possessive. Linear scans take well under a second here.
    started = time.perf_counter()
    scan(text)
    assert time.perf_counter() - started < 5.0


def test_a_passports_machine_readable_zone_is_found_by_its_shape_with_or_without_valid_check_digits():
    specimen = "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<\nL898902C36UTO7408122F1204159ZE184226B<<<<<10"
    misread = "Is this right? P<D<<VOGT<<LUKAS<<<<<<<<<<<<<<<<<<<<<<<<<<<< C7MH26J8P0D<<7301153F2803076<<<<<<<<<<<<<<<0"
    for text in (specimen, misread):
        kinds = {f.kind for f in scan(text).findings}
        assert {"PASSPORT", "PERSON"} <= kinds, text


def test_shift_operators_and_angle_brackets_in_code_are_not_a_machine_readable_zone():
    code = 'if (a << b) { print("P<<x"); }\nmask = FLAGS << 2 | Q<<3; template<class T> P<T> p;'
    assert not [f for f in scan(code).findings if f.kind in ("PASSPORT", "PERSON")]


def test_an_identity_documents_name_before_its_number_is_no_person_even_beside_other_pii():
    from inference.pii.findings import PiiFinding
    from inference.pii.non_names import NonNames

    text = "Reisepass: 33VT15715\nKontakt: jan.novak@example.org"
    guess = PiiFinding.at(PiiKind.PERSON, text, 0, 9, 0.8)  # as the name model read it, 19 times in the evaluation
    gazetteer = NameModel.load().gazetteer
    assert NonNames.load().overrules(text, guess, gazetteer, other_pii=True)
    assert "Reisepass" not in texts_of(text, PiiKind.PERSON)
    assert texts_of("Reisepass von Jan Novak: 33VT15715", PiiKind.PERSON) == ["Jan Novak"]


# the extended router set (2026-12-02) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("次の文を英語に訳してください：「私のメールアドレスはyumi.suzuki@gmail.comです。」", "yumi.suzuki@gmail.com"),
        ("我的邮箱是wang.wei@qq.com，谢谢", "wang.wei@qq.com"),
        ("제 이메일은minjun.kim@naver.com입니다", "minjun.kim@naver.com"),
    ],
)
def test_email_touching_cjk_text_is_found(text: str, address: str):
    # Han, kana and Hangul put no space around an address, as around a phone number.
    assert texts_of(text, PiiKind.EMAIL) == [address]


@pytest.mark.parametrize(
    "text", ["Traduz: 'O meu NIF é 238559467 e a morada está no recibo.'", "Número de contribuinte: 238 559 467"]
)
def test_portuguese_tax_number_after_its_cue_is_a_national_id(text: str):
    assert [t.replace(" ", "") for t in texts_of(text, PiiKind.NATIONAL_ID)] == ["238559467"]


@pytest.mark.parametrize(
    "text",
    [
        "O meu NIF é 238559468.",  # check digit wrong
        "O NIF da empresa é 501442600.",  # valid, but a company's number (5...): no one's personal data
    ],
)
def test_portuguese_tax_number_failing_its_check_or_of_a_company_is_not_pii(text: str):
    assert not scan(text)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Vertaal: 'Het wifi-wachtwoord van het vakantiehuis is Nordwind&56MV3pt7?.'", "Nordwind&56MV3pt7?"),
        ("The password for the guest network is Tr0ub4dor&3", "Tr0ub4dor&3"),
        ("Das Passwort vom Router lautet Sommer2024!", "Sommer2024!"),
        ("Le mot de passe du wifi est Soleil#42", "Soleil#42"),
        ("La password del wifi è Ciao1234x", "Ciao1234x"),
        ("WLAN-Schlüssel: Kx9mP2vLq", "Kx9mP2vLq"),
    ],
)
def test_password_with_whose_it_is_between_the_word_and_the_verb_is_a_credential(text: str, secret: str):
    (found,) = texts_of(text, PiiKind.CREDENTIAL)
    assert found.startswith(secret)


@pytest.mark.parametrize(
    "text",
    [
        "The password for the account is required.",
        "The password is required.",
        "the password for your account: must be 8 characters",
        "the password of the user is stored as a hash",
    ],
)
def test_prose_about_a_password_is_not_a_credential(text: str):
    assert not scan(text)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "9.9.9.9", "2606:4700:4700::1111"])
def test_public_dns_resolvers_are_no_ones_address(address: str):
    assert not scan(f"What is {address} and who runs it?")
    assert texts_of(f"Set DNS to {address}; my home IP is 81.206.130.46", PiiKind.IP_ADDRESS) == ["81.206.130.46"]


def test_an_address_next_to_a_resolver_is_still_an_ip_address():
    assert texts_of("ping 8.8.8.9", PiiKind.IP_ADDRESS) == ["8.8.8.9"]


@pytest.mark.parametrize(
    "text",
    [
        "Dlaczego w przykładowych formularzach zawsze pojawia się 'Jan Kowalski'?",
        "In het voorbeeldformulier staat Jan Jansen als aanvrager.",
    ],
)
def test_placeholder_names_of_other_languages_are_not_pii(text: str):
    assert not scan(text)


def test_placeholder_name_with_personal_details_is_pii():
    text = "Jan Kowalski, tel. 601 234 567, jan.kowalski@wp.pl"
    assert texts_of(text, PiiKind.PERSON) == ["Jan Kowalski"]


@pytest.mark.parametrize(
    "text",
    ["Cześć! Jak się masz? Opowiedz mi krótki dowcip.", "Olá! Sugere-me um nome giro para um peixinho dourado."],
)
def test_a_greeting_opening_a_message_is_no_name(text: str):
    assert not scan(text)


def test_a_name_after_a_greeting_is_still_a_name():
    assert texts_of("Cześć! Anna Nowak pyta o termin.", PiiKind.PERSON) == ["Anna Nowak"]


@pytest.mark.parametrize("text", ["Ile województw ma Polska?", "Hur många län har Sverige?"])
def test_a_country_written_in_its_own_language_is_no_name(text: str):
    assert not scan(text)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Write a birthday message for my colleague Aisha Sutherland; she turns 40.", "Aisha Sutherland"),
        ("Schreib meiner Kollegin Aisha Sutherland eine kurze Nachricht.", "Aisha Sutherland"),
        ("Mi hermana Lucía Fernández llega mañana.", "Lucía Fernández"),
        ("O meu colega Tiago Rodrigues chega amanhã.", "Tiago Rodrigues"),
    ],
)
def test_a_name_after_a_relative_or_workmate_is_found(text: str, name: str):
    assert name in texts_of(text, PiiKind.PERSON)


@pytest.mark.parametrize(
    ("text", "name"),
    [("My colleague Jan de Vries will call.", "Jan de Vries"), ("my colleague John F. Quimby said", "John F. Quimby")],
)
def test_a_name_after_a_relative_is_read_whole_across_particles_and_initials(text: str, name: str):
    from inference.pii.cued_names import find_cued_names

    gazetteer = NameModel.load().gazetteer
    assert [f.text for f in find_cued_names(text, gazetteer)] == [name]
    assert texts_of(text, PiiKind.PERSON) == [name]


@pytest.mark.parametrize(
    "text",
    ["Ask my friend Python.", "My colleague said hi.", "Tell my boss Monday works.", "Is this my colleague? No."],
)
def test_a_relative_word_before_no_name_finds_nothing(text: str):
    assert not texts_of(text, PiiKind.PERSON)


@pytest.mark.parametrize(
    ("text", "name"), [("伊藤 美咲さんへの短いお礼", "伊藤 美咲"), ("山田 太郎様へのご案内", "山田 太郎")]
)
def test_japanese_full_name_before_an_honorific_is_found(text: str, name: str):
    assert texts_of(text, PiiKind.PERSON) == [name]


@pytest.mark.parametrize("text", ["お客様へのメールを書いて", "皆さん、こんにちは", "店長さんに聞いてください"])
def test_japanese_roles_with_an_honorific_are_no_names(text: str):
    assert not scan(text)


def test_national_figure_in_a_public_role_is_not_pii_but_is_with_personal_details():
    assert not scan("Chi era Giuseppe Garibaldi, in una frase?")
    assert not scan("Garibaldi sbarcò a Marsala nel 1860.")
    tied = "Giuseppe Garibaldi, email g.garibaldi@gmail.com"
    assert texts_of(tied, PiiKind.PERSON) == ["Giuseppe Garibaldi"]
