from pathlib import Path

from yunque.paths import yunque_home


def test_yunque_home_then_the_xdg_cache_then_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("YUNQUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert yunque_home() == tmp_path / "home"
    monkeypatch.delenv("YUNQUE_HOME")
    assert yunque_home() == tmp_path / "cache" / "yunque"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore relative paths
    assert yunque_home() == Path.home() / ".cache" / "yunque"
    monkeypatch.setenv("YUNQUE_HOME", "~/elsewhere")
    assert yunque_home() == Path.home() / "elsewhere"
