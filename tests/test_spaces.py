"""Operation spaces (DESIGN.md "Operation spaces"; DyRep Table 1) and their user errors."""

import pytest

from repsearch.spaces import BRANCH_KINDS, SpaceError, list_spaces, resolve_space, spaces_dir


def test_shipped_spaces():
    spaces = list_spaces()
    assert list(spaces) == ["acb", "dbb", "dyrep", "repvgg"]
    assert resolve_space("repvgg") == ("kxk", "1x1", "identity")
    assert resolve_space("dbb") == ("kxk", "1x1", "1x1-kxk", "1x1-avg")
    assert resolve_space("acb") == ("kxk", "1xk", "kx1")
    assert resolve_space("dyrep") == BRANCH_KINDS
    assert BRANCH_KINDS == ("kxk", "1x1", "1x1-kxk", "1x1-avg", "1xk", "kx1", "identity")
    for name, (desc, branches) in spaces.items():
        assert desc and branches[0] == "kxk"
    assert (spaces_dir() / "dyrep.yaml").is_file()


def test_inline_lists_are_canonical_and_include_kxk():
    assert resolve_space(["identity", "1x1", "identity"]) == ("kxk", "1x1", "identity")
    assert resolve_space(("kx1", "kxk")) == ("kxk", "kx1")
    assert resolve_space([]) == ("kxk",)


def test_errors_name_allowed_values():
    with pytest.raises(SpaceError) as e:
        resolve_space("repvg")
    assert str(e.value) == "unknown space 'repvg'; available: acb, dbb, dyrep, repvgg"
    with pytest.raises(SpaceError) as e:
        resolve_space(["1x1", "3x3"])
    assert str(e.value) == (
        "unknown branch type '3x3' is not one of kxk, 1x1, 1x1-kxk, 1x1-avg, 1xk, kx1, identity"
    )
    assert issubclass(SpaceError, ValueError)
    with pytest.raises(SpaceError):
        resolve_space(7)


def test_env_override_and_malformed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("REPSEARCH_SPACES", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("name: mine\ndescription: test\nbranches: [1x1, kxk]\n")
    assert list_spaces() == {"mine": ("test", ("kxk", "1x1"))}
    assert resolve_space("mine") == ("kxk", "1x1")
    with pytest.raises(SpaceError, match="available: mine"):
        resolve_space("dbb")
    bad_cases = {
        "wrongname.yaml": ("name: other\ndescription: d\nbranches: [1x1]\n", "does not match"),
        "extra.yaml": ("name: extra\ndescription: d\nbranches: [1x1]\ncolor: red\n", "unknown field 'color'"),
        "missing.yaml": ("name: missing\ndescription: d\n", "missing field 'branches'"),
        "kind.yaml": ("name: kind\ndescription: d\nbranches: [1x1, 2x2]\n", "unknown branch type '2x2'"),
        "str.yaml": ("name: str\ndescription: d\nbranches: 1x1\n", "must be a list"),
        "yaml.yaml": ("name: [unclosed\n", "cannot read"),
        "list.yaml": ("- 1x1\n", "mapping"),
    }
    for fname, (text, msg) in bad_cases.items():
        for f in tmp_path.glob("*.yaml"):
            f.unlink()
        (tmp_path / fname).write_text(text)
        with pytest.raises(SpaceError, match=msg) as e:
            list_spaces()
        assert fname in str(e.value) and "\n" not in str(e.value)
