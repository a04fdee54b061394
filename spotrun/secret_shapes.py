"""What a secret looks like, in one place: the ``--env``/``--setup`` check of EC2 user data
(:mod:`spotrun.launch.userdata`) refuses these shapes, and the CLI's log filter
(:mod:`spotrun.cli.redact`) masks them, so the two can never disagree about what a secret is.
Torch-free and dependency-free.
"""

from __future__ import annotations

import re

__all__ = ["TOKEN_SHAPES"]

#: Tokens with a recognisable shape: Hugging Face, GitHub, GitLab, OpenAI/Anthropic (``sk-``),
#: Stripe (``sk_live_``/``rk_test_``...), Slack tokens and incoming-webhook URLs, Google API
#: keys (``AIza`` + 35), JSON Web Tokens (``eyJ...``.``eyJ...``.sig), HTTP bearer tokens,
#: private keys, and passwords inside URLs (https://user:pass@host, pip index URLs).
#: ``Bearer $TOKEN`` (a shell reference, not a value) does not match.
TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{30,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
    r"|\bgithub_pat_[A-Za-z0-9_]{22,}"
    r"|\bglpat-[A-Za-z0-9_-]{20,}"
    r"|\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}"
    r"|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{8,}"
    r"|\bAIza[0-9A-Za-z_-]{35}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r"|\b[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/-]{16,}=*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"
)
