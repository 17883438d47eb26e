import pytest

from deployments.auth import KeyRing, bearer_token, hash_key, new_key, owner_of


def test_keys_are_checked_against_digests_only():
    key, digest = new_key()
    other, other_digest = new_key()
    ring = KeyRing([digest, other_digest])
    assert ring.owner(key) == owner_of(digest) != ring.owner(other)
    assert ring.owner("iid_guess") is None and ring.owner("") is None
    assert digest == hash_key(key) and key not in repr(ring.__dict__)


def test_digests_from_the_environment(monkeypatch):
    key, digest = new_key()
    monkeypatch.setenv("TEST_KEYS", f" {digest.upper()} , ")
    assert KeyRing([], env_var="TEST_KEYS").owner(key) == owner_of(digest)


def test_plain_keys_are_refused_as_configuration():
    with pytest.raises(ValueError, match="SHA-256"):
        KeyRing(["iid_plaintext-key"])


@pytest.mark.parametrize("header,token", [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None),
                                          ("Bearer", None), (None, None), ("", None)])
def test_bearer_parsing(header, token):
    assert bearer_token(header) == token
