"""Bearer-token check for the scoring and model routes (`/v1/*`, `/v2/*`, `/rerank`, `/score`).

Tokens are compared in constant time against every configured token (several allow rotation),
the scheme is matched in any letter case (RFC 7235), and the credentials are taken exactly as
sent: a token with stray spaces is a different token.
"""

from __future__ import annotations

import hmac

from api.errors import ApiError


#: Paths under these prefixes, and these paths, need the token; the rest (/health, /ready, /info,
#: /metrics unless METRICS_AUTH, /openapi.json, /docs) stay public, as TEI's do with --api-key.
PROTECTED_PREFIXES = ("/v1/", "/v2/")
PROTECTED_PATHS = ("/rerank", "/score")


def needs_token(path: str, *, metrics_auth: bool) -> bool:
    """Whether a request to `path` (or a route with that rule) must carry the token. The app's
    check and the OpenAPI document's `security` both ask this, so they cannot disagree."""
    return (path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_PATHS
            or (path == "/metrics" and metrics_auth))


def token_matches(header: str | None, tokens: list[str]) -> bool:
    if not header:
        return False
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return False
    given = credentials.encode()
    matched = False
    for token in tokens:  # no early exit: timing does not tell which token or how far it matched
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def require_token(header: str | None, tokens: list[str]) -> None:
    """Raise 401 unless the server is open (no tokens) or the header carries a valid token."""
    if tokens and not token_matches(header, tokens):
        raise ApiError(
            401,
            "missing or invalid bearer token" if header else "missing Authorization header",
            headers={"WWW-Authenticate": 'Bearer realm="rerank"'},
        )


def presented_token(header: str | None) -> str | None:
    """The bearer token of an (already accepted) Authorization header, to tell job owners apart."""
    if not header:
        return None
    scheme, _, credentials = header.partition(" ")
    return credentials if scheme.lower() == "bearer" and credentials else None
