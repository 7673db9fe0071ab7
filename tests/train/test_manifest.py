"""The manifest of a saved folder: written last, it says which files make the folder complete; a file
removed, truncated, zeroed or rewritten afterwards is named."""

import os

import pytest
import xxhash

from chatglm3_finetune.train import manifest
from chatglm3_finetune.train.manifest import ManifestError, check_folder, folder_problem, write_manifest


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "checkpoint-4"
    (folder / "global_step4").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "optimizer.pt").write_bytes(os.urandom(5000))
    (folder / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(700))
    write_manifest(str(folder), 4)
    return folder


def test_a_complete_folder_checks_and_lists_every_file_with_its_step(saved):
    written = check_folder(str(saved))
    assert written["global_step"] == 4
    assert sorted(written["files"]) == ["global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                        "model.safetensors", "optimizer.pt"]
    assert written["files"]["optimizer.pt"]["size"] == 5000
    assert folder_problem(str(saved)) is None


def test_the_checksum_reads_the_whole_file_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "BLOCK_SIZE", 1000)
    data = os.urandom(4321)
    (tmp_path / "f").write_bytes(data)
    assert manifest.file_checksum(str(tmp_path / "f")) == xxhash.xxh3_128(data).hexdigest()


def zero(path):
    path.write_bytes(b"\0" * path.stat().st_size)


@pytest.mark.parametrize("damage, problem", [
    (lambda f: os.remove(f / "optimizer.pt"), "optimizer.pt is missing"),
    (lambda f: os.truncate(f / "model.safetensors", 100), "model.safetensors has 100 bytes where 3,000 were written"),
    (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors has 0 bytes where 3,000 were written"),
    (lambda f: zero(f / "optimizer.pt"), "optimizer.pt does not hold what was written (its checksum differs)"),
    (lambda f: zero(f / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
     "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt does not hold what was written"),
    (lambda f: os.remove(f / "manifest.json"), "no manifest.json: its save did not complete"),
    (lambda f: (f / "manifest.json").write_text("{\"files\": "), "manifest.json is unreadable"),
])
def test_each_damage_is_named(saved, damage, problem):
    damage(saved)
    assert folder_problem(str(saved)).startswith(problem)
    with pytest.raises(ManifestError):
        check_folder(str(saved))


def test_a_file_added_later_does_not_make_the_folder_incomplete(saved):
    (saved / "notes.txt").write_text("mine")
    assert folder_problem(str(saved)) is None


def test_the_manifest_describes_the_files_it_is_given(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    (tmp_path / "run_record.json").write_text("{}")  # changes later: not part of the model
    write_manifest(str(tmp_path), 2, manifest.describe(str(tmp_path), ["model.safetensors"]))
    (tmp_path / "run_record.json").write_text('{"finished": true}')
    assert list(check_folder(str(tmp_path))["files"]) == ["model.safetensors"]
