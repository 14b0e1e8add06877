"""PII detection for the request router: ``scan`` finds personal data and secrets in a prompt (PII must never
reach the cloud tier), ``redact`` replaces them with placeholders and ``StreamRestorer`` puts them back into a
streamed reply. Django-free by design; see docs/pii.md for what is detected and how well.
"""

from inference.pii.detector import Detector, default_detector, scan
from inference.pii.errors import PiiError, PiiModelError
from inference.pii.findings import PiiFinding, PiiKind, PiiReport
from inference.pii.redaction import Redaction, StreamRestorer, redact

__all__ = [
    "Detector",
    "PiiError",
    "PiiFinding",
    "PiiKind",
    "PiiModelError",
    "PiiReport",
    "Redaction",
    "StreamRestorer",
    "default_detector",
    "redact",
    "scan",
]
