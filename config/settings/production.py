"""Production: the secret key, hosts and database must come from the environment."""

from config.env import get_env
from config.settings.base import *  # noqa: F403

SECRET_KEY = get_env("TANDEM_SECRET_KEY")
ALLOWED_HOSTS = get_env("TANDEM_ALLOWED_HOSTS").split(",")
get_env("DATABASE_URL")  # required here: base.py configured DATABASES from it (with its pool)
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
