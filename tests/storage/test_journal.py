"""storage/journal.py: the resume journal keeps finished pairs, saves only new ones, and starts over for other settings."""

from __future__ import annotations

import json

import zarr

from sphero_lightning.storage.journal import Journal


def test_journal_with_other_settings_is_not_reused(tmp_path, capsys):
    j = Journal(tmp_path / "j", {"model": {"loss": "ncc"}, "shape": (4, 8, 8)})
    j.save({0: {"matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "final_loss": float("inf")}})
    assert list(Journal(tmp_path / "j", {"model": {"loss": "ncc"}, "shape": [4, 8, 8]}).load()) == [0]
    # a valid zarr group, so zarr tools listing the store do not trip over it
    assert "sphero_journal" in zarr.open_group(str(tmp_path / "j"), mode="r").attrs
    other = Journal(tmp_path / "j", {"model": {"loss": "mse"}, "shape": [4, 8, 8]})
    assert other.load() == {}
    other.save({1: {"matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "final_loss": 0.5}})  # a run starting over
    assert capsys.readouterr().err.count("other settings") == 1  # said once, not again by the first save
    assert list(Journal(tmp_path / "j", {"model": {"loss": "mse"}, "shape": [4, 8, 8]}).load()) == [1]
    (tmp_path / "j" / "zarr.json").write_text("{ torn")
    assert Journal(tmp_path / "j", {}).load() == {}


def test_journal_saves_only_new_pairs_and_starts_over_for_other_settings(tmp_path):
    fp = {"model": {"loss": "ncc"}}
    j = Journal(tmp_path / "j", fp)
    results = {0: {"final_loss": 0.1}, 1: {"final_loss": 0.2}}
    j.save(results)
    j.save(results)  # nothing new: no new file
    results[2] = {"final_loss": 0.3}
    j.save(results)
    parts = sorted(p.name for p in (tmp_path / "j").glob("pairs-*.json"))
    assert parts == ["pairs-00000000-00000001.json", "pairs-00000002-00000002.json"]
    assert json.loads((tmp_path / "j" / parts[1]).read_text()) == {"2": {"final_loss": 0.3}}
    assert Journal.count_saved(tmp_path / "j") == 3
    again = Journal(tmp_path / "j", fp)
    assert again.load() == results
    again.save({**results, 3: {"final_loss": 0.4}})
    assert Journal.count_saved(tmp_path / "j") == 4
    # other settings: the old pairs are dropped when the new run saves
    other = Journal(tmp_path / "j", {"model": {"loss": "mse"}})
    assert other.load() == {}
    other.save({0: {"final_loss": 9.0}})
    assert Journal(tmp_path / "j", {"model": {"loss": "mse"}}).load() == {0: {"final_loss": 9.0}}
