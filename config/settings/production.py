"""Production: the secret key, hosts and database must come from the environment; HTTPS is assumed.

``python manage.py check --deploy`` is clean with these settings (tests/test_security.py).
HTTPS is on by default here (``TANDEM_HTTPS=1``): Secure session and CSRF cookies, http
redirected to https, HSTS for a year with includeSubDomains, and the TLS proxy's
``X-Forwarded-Proto`` trusted. Each is an environment override, listed in
``config/settings/security.py``; e.g. a deployment reached over plain http (a private
network, docker compose on a laptop) sets ``TANDEM_HTTPS=0``.
"""

from config.env import get_env
from config.settings.base import *  # noqa: F403
from config.settings.security import transport_security

SECRET_KEY = get_env("TANDEM_SECRET_KEY")
ALLOWED_HOSTS = get_env("TANDEM_ALLOWED_HOSTS").split(",")
get_env("DATABASE_URL")  # required here: base.py configured DATABASES from it (with its pool)
globals().update(transport_security(https_default=True, proxy_header_default="X-Forwarded-Proto"))
