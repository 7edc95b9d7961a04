"""API credentials without Ray: the token file, scopes, expiry and reloading on change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import token_entry as entry
from tests.factories import write_tokens
from tipgraph.auth import (
    ENV_TOKEN_ID,
    SCOPES,
    CredentialSource,
    TokenFileError,
    hash_token,
    new_token,
    parse_scopes,
    parse_token_file,
    required_scope,
    token_entry_yaml,
)
from tipgraph.settings import AuthSettings
from tipgraph_ops.cli import main as cli_main


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, entry("recommender", "tok-a", "tips", "feedback"))
    return path


def source(path: Path, clock: Clock, **settings: object) -> CredentialSource:
    auth = AuthSettings(api_token=None, tokens_file=str(path), reload_interval_s=1.0, **settings)
    return CredentialSource(auth, clock=clock)


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/v1/tips", "tips"),
        ("POST", "/v1/feedback", "feedback"),
        ("DELETE", "/v1/users/alice", "erase"),
        ("GET", "/v1/tips", "admin"),
        ("DELETE", "/v1/tips", "admin"),
        ("POST", "/v1/users/alice", "admin"),
        ("POST", "/v1/anything-new", "admin"),
    ],
)
def test_each_route_needs_its_scope_and_anything_else_admin(
    method: str, path: str, scope: str
) -> None:
    assert required_scope(method, path) == scope


def test_a_token_is_known_by_its_hash_and_allows_only_its_scopes(
    tokens_file: Path,
) -> None:
    credentials = source(tokens_file, Clock()).current()
    found = credentials.authenticate("tok-a")
    assert found is not None and found.id == "recommender"
    assert found.allows("tips") and found.allows("feedback")
    assert not found.allows("erase") and not found.allows("admin")
    assert credentials.authenticate("tok-b") is None
    assert credentials.authenticate("tok-a ") is None
    assert credentials.authenticate(hash_token("tok-a")) is None  # the hash is no token
    assert "tok-a" not in tokens_file.read_text()


def test_admin_allows_every_scope_and_the_env_token_is_admin(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, entry("ops", "tok-ops", "admin"))
    auth = AuthSettings(api_token="tok-env", tokens_file=str(path))
    credentials = CredentialSource(auth).current()
    for token, token_id in (("tok-ops", "ops"), ("tok-env", ENV_TOKEN_ID)):
        found = credentials.authenticate(token)
        assert found is not None and found.id == token_id
        assert all(found.allows(scope) for scope in SCOPES)


def test_a_token_past_not_after_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, entry("old", "tok-old", "tips", not_after="2026-01-01T00:00:00Z"))
    credentials = CredentialSource(AuthSettings(api_token=None, tokens_file=str(path))).current()
    deadline = 1767225600.0  # 2026-01-01T00:00:00Z
    assert credentials.authenticate("tok-old", now=deadline - 1) is not None
    assert credentials.authenticate("tok-old", now=deadline) is None


def test_a_changed_file_is_reloaded_at_the_next_check_and_not_before(
    tokens_file: Path,
) -> None:
    clock = Clock()
    tokens = source(tokens_file, clock)
    # The rotation's overlap: the new token added, the old one still valid.
    write_tokens(
        tokens_file,
        entry("recommender", "tok-a", "tips", "feedback"),
        entry("recommender-2", "tok-b", "tips", "feedback"),
    )
    clock.now = 0.5
    assert tokens.current().authenticate("tok-b") is None  # not checked yet
    clock.now = 1.0
    assert tokens.current().authenticate("tok-b") is not None
    assert tokens.current().authenticate("tok-a") is not None
    write_tokens(tokens_file, entry("recommender-2", "tok-b", "tips", "feedback"))
    clock.now = 2.0
    assert tokens.current().authenticate("tok-a") is None
    assert tokens.current().ids == ("recommender-2",)


def test_a_broken_file_keeps_the_tokens_in_force_until_it_is_fixed(
    tokens_file: Path,
) -> None:
    clock = Clock()
    outcomes: list[str] = []
    auth = AuthSettings(api_token=None, tokens_file=str(tokens_file), reload_interval_s=1.0)
    tokens = CredentialSource(auth, clock=clock, on_reload=outcomes.append)
    # Cut off, invalid, and empty (a file rewritten in place, read half-way).
    for broken in ("tokens: [{id: x", "tokens: [{id: x, sha256: abc, scopes: [tips]}]", ""):
        tokens_file.write_text(broken)
        clock.now += 1
        assert tokens.current().authenticate("tok-a") is not None
    tokens_file.unlink()
    clock.now += 1
    assert tokens.current().authenticate("tok-a") is not None
    write_tokens(tokens_file, entry("fixed", "tok-c", "tips"))
    clock.now += 1
    assert tokens.current().ids == ("fixed",)
    assert outcomes == ["failed", "failed", "failed", "failed", "reloaded"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens: [{id: a, sha256: '%s', scopes: [read]}]" % ("0" * 64), "scopes"),
        ("tokens: [{id: a, sha256: '%s', scopes: []}]" % ("0" * 64), "scopes"),
        ("tokens: [{id: a, sha256: nothex, scopes: [tips]}]", "sha256"),
        ("tokens: [{id: 'a b', sha256: '%s', scopes: [tips]}]" % ("0" * 64), "id"),
        ("tokens: [{id: a, sha256: '%s', scopes: [tips], role: x}]" % ("0" * 64), "role"),
        (
            "tokens: [{id: a, sha256: '%s', scopes: [tips], not_after: 2027-01-01T00:00:00}]"
            % ("0" * 64),
            "time zone",
        ),
        ("[1, 2]", "tokens.0"),
        ("tokens: 3", "tokens"),
        ("tokens: [{id: a", "not YAML"),
    ],
)
def test_an_invalid_token_file_names_its_fault(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        parse_token_file(text, where="tokens.yaml")


def test_ids_and_tokens_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    write_tokens(path, entry("a", "tok-1", "tips"), entry("a", "tok-2", "tips"))
    with pytest.raises(TokenFileError, match="repeated: a"):
        CredentialSource(AuthSettings(api_token=None, tokens_file=str(path)))
    write_tokens(path, entry("a", "tok-1", "tips"), entry("b", "tok-1", "erase"))
    with pytest.raises(TokenFileError, match="same sha256"):
        CredentialSource(AuthSettings(api_token=None, tokens_file=str(path)))


def test_no_token_at_all_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="no API token"):
        CredentialSource(AuthSettings(api_token=None))
    empty = tmp_path / "tokens.yaml"
    empty.write_text("tokens: []\n")
    with pytest.raises(TokenFileError, match="no API token"):
        CredentialSource(AuthSettings(api_token=None, tokens_file=str(empty)))
    with pytest.raises(TokenFileError, match="No such file"):
        CredentialSource(AuthSettings(api_token=None, tokens_file=str(tmp_path / "missing")))


def test_scopes_are_parsed_and_checked() -> None:
    assert parse_scopes("feedback, tips") == ("tips", "feedback")
    with pytest.raises(ValueError, match="unknown read"):
        parse_scopes("tips,read")
    with pytest.raises(ValueError, match="none given"):
        parse_scopes(" , ")


def test_new_tokens_are_random_and_their_entries_load() -> None:
    first, second = new_token(), new_token()
    assert first != second and len(first) >= 40
    text = "tokens:\n" + token_entry_yaml("svc-1", first, ("tips", "feedback"))
    (credential,) = parse_token_file(text, where="new")
    assert credential.id == "svc-1" and credential.scopes == {"tips", "feedback"}
    assert first not in text
    with pytest.raises(ValueError, match="token id"):
        token_entry_yaml("has space", first, ("tips",))


def test_token_new_prints_the_token_once_and_entries_that_append_to_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "tokens.yaml"
    tokens = {}
    for token_id, scopes in (("recommender", "tips,feedback"), ("privacy-desk", "erase")):
        assert cli_main(["token", "new", "--id", token_id, "--scopes", scopes]) == 0
        out, err = capsys.readouterr()
        tokens[token_id] = err.strip().rsplit(" ", 1)[-1]
        assert tokens[token_id] not in out
        with path.open("a") as file:  # as the runbook's `>> tokens.yaml`
            file.write(out)
    found = CredentialSource(AuthSettings(api_token=None, tokens_file=str(path))).current()
    recommender = found.authenticate(tokens["recommender"])
    privacy = found.authenticate(tokens["privacy-desk"])
    assert recommender is not None and recommender.id == "recommender"
    assert privacy is not None and privacy.id == "privacy-desk"
    assert recommender.allows("feedback") and not recommender.allows("erase")
    assert privacy.allows("erase") and not privacy.allows("tips")
    assert cli_main(["token", "new", "--id", "x", "--scopes", "everything"]) == 1
    assert "unknown everything" in capsys.readouterr().err
