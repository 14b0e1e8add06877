"""Build ``inference/assets/pii/non_names.json.gz``, the word lists that overrule the name model (dev only: needs
Faker and pycountry).

    python -m inference.pii.non_names_build

Places: country names in the languages Faker writes them in and pycountry's names, states and regions of
Faker's address providers, the real city lists Faker ships for de, nl and pl, and a hand list of world cities,
rivers, mountains and regions (a multi-word place is written with ``_``), and the countries' own names for
themselves that those lists lack ("Polska", "Sverige"). Products: a hand list of software, languages and brands that are also words or
names. Eponyms: surnames that prompts mostly meet inside a law, theorem or unit.
"""

from __future__ import annotations

import gzip
import importlib
import json

import pycountry

from inference.pii.non_names import NON_NAMES_FORMAT, NON_NAMES_PATH

_ADDRESS_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "pl_PL")
# Only these locales' ``cities`` are real, and short enough to carry few surnames (it_IT lists 16,000 comuni).
_CITY_LOCALES = ("de_DE", "nl_NL", "pl_PL")
_WORLD = """
london paris berlin madrid rome vienna prague budapest warsaw lisbon porto dublin edinburgh glasgow manchester
liverpool birmingham leeds bristol cardiff belfast amsterdam rotterdam utrecht the_hague brussels antwerp bruges
ghent luxembourg zurich geneva basel bern lausanne munich hamburg cologne frankfurt stuttgart dresden leipzig
hanover nuremberg bremen düsseldorf salzburg innsbruck graz lyon marseille bordeaux toulouse nice nantes lille
strasbourg montpellier seville valencia barcelona bilbao granada malaga málaga zaragoza florence venice naples
milan turin bologna genoa palermo verona pisa krakow kraków gdansk wroclaw athens thessaloniki istanbul ankara
helsinki oslo bergen stockholm gothenburg copenhagen aarhus reykjavik tallinn riga vilnius kyiv kiev moscow
saint_petersburg bucharest sofia belgrade zagreb ljubljana sarajevo tirana new_york los_angeles chicago houston
phoenix philadelphia san_antonio san_diego dallas austin seattle denver boston atlanta miami detroit portland
san_francisco las_vegas nashville new_orleans toronto vancouver montreal ottawa calgary mexico_city guadalajara
havana bogotá bogota lima santiago quito caracas buenos_aires montevideo são_paulo sao_paulo rio_de_janeiro
brasília cairo alexandria lagos abuja nairobi addis_ababa accra dakar casablanca marrakesh marrakech tunis
algiers johannesburg cape_town durban kinshasa dar_es_salaam kampala tokyo kyoto osaka yokohama sapporo seoul
busan beijing shanghai shenzhen guangzhou hong_kong taipei singapore bangkok hanoi ho_chi_minh_city jakarta bali
manila kuala_lumpur mumbai delhi new_delhi bangalore bengaluru chennai kolkata hyderabad karachi lahore dhaka
kathmandu colombo dubai abu_dhabi doha riyadh jeddah tehran baghdad beirut jerusalem tel_aviv amman sydney
melbourne brisbane perth adelaide canberra auckland wellington christchurch
danube rhine elbe oder seine loire rhône rhone thames severn nile amazon mississippi missouri ganges yangtze
tagus ebro po tiber volga mekong zambezi congo niger euphrates tigris jordan
alps pyrenees andes himalaya himalayas rockies appalachians carpathians dolomites everest kilimanjaro mont_blanc
matterhorn
europe asia africa america north_america south_america australia oceania antarctica arctic scandinavia
balkans caucasus siberia sahara patagonia bavaria tuscany provence andalusia catalonia normandy brittany
burgundy alsace lombardy sicily sardinia corsica crete cyprus scotland wales england ireland northern_ireland
cornwall yorkshire flanders wallonia silicon_valley california texas florida alaska hawaii virginia georgia
carolina ontario quebec british_columbia
""".split()
# Countries as their own people write them, where neither pycountry nor the address locales do ("Ile województw
# ma Polska?"); pycountry and Faker already give "Deutschland", "España", "Italia", "Nederland", "Österreich".
_ENDONYMS = """
polska polsko sverige norge noreg danmark suomi ísland eesti latvija lietuva česko česká_republika slovensko
slovenija hrvatska srbija magyarország românia bălgarija shqipëria éire cymru alba
""".split()
_PRODUCTS = """
python django flask fastapi pandas numpy scipy matplotlib seaborn pytorch tensorflow keras jupyter
kubernetes docker terraform ansible jenkins gitlab github bitbucket jira confluence trello asana notion figma
slack zoom teams outlook excel word powerpoint salesforce hubspot mailchimp shopify stripe twilio heroku netlify
vercel grafana prometheus kafka cassandra elasticsearch kibana redis postgres postgresql mysql mongodb sqlite
oracle cisco adobe nvidia intel amd apple google microsoft amazon meta tesla spotify netflix dropbox zapier
airtable laravel symfony rails ruby scala julia swift kotlin rust golang haskell erlang elixir clojure perl
angular react svelte vue nextjs hugo jekyll gatsby wordpress drupal joomla magento ubuntu debian fedora
android ios windows linux macos chrome firefox safari opera siemens bosch volkswagen renault toyota samsung
huawei xiaomi nestlé unilever carrefour zalando ikea lego nike adidas
""".split()
_EPONYMS = """
fermat euler gauss bayes riemann fourier laplace dijkstra kruskal bellman hamming huffman markov poisson
bernoulli cauchy lagrange hilbert noether gödel godel ohm kirchhoff faraday planck bohr heisenberg schrödinger
schrodinger pauli boltzmann avogadro coulomb ampère ampere joule hooke boyle pythagoras euclid archimedes
thales kepler copernicus hubble doppler mendel pavlov keynes pareto zipf benford levenshtein jaccard amdahl
occam ockham stokes navier dirichlet jacobi legendre weierstrass chebyshev lyapunov kolmogorov turing
leibniz descartes fibonacci mandelbrot hausdorff banach lebesgue sobolev schwarz minkowski lorentz hertz
kelvin celsius fahrenheit newton galileo snell huygens bragg raman compton fermi dirac feynman rutherford
curie mendeleev lavoisier chatelier gay-lussac torricelli venturi
""".split()


def _places() -> set[str]:
    places = {word.replace("_", " ") for word in (*_WORLD, *_ENDONYMS)}
    for country in pycountry.countries:
        for attribute in ("name", "common_name"):
            value = getattr(country, attribute, None)
            if value:
                places.add(value.lower())
    for locale in _ADDRESS_LOCALES:
        provider = importlib.import_module(f"faker.providers.address.{locale}").Provider
        for attribute in ("countries", "states"):
            places.update(str(value).lower() for value in getattr(provider, attribute, ()))
        if locale in _CITY_LOCALES:
            places.update(str(value).lower() for value in getattr(provider, "cities", ()))
    return {p for p in places if len(p) > 2}


def main() -> None:
    payload = {
        "format": NON_NAMES_FORMAT,
        "places": sorted(_places()),
        "products": sorted(set(_PRODUCTS)),
        "eponyms": sorted({e.replace("_", " ") for e in _EPONYMS}),
    }
    NON_NAMES_PATH.write_bytes(gzip.compress(json.dumps(payload, ensure_ascii=False).encode("utf-8"), mtime=0))


if __name__ == "__main__":
    main()
