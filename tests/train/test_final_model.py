"""The final model's files: moved into place from the aside folder with their manifest last, files of
an older final model removed; what of a checkpoint makes the final model (not its resume state)."""

import os

from chatglm3_finetune.train import final_model
from chatglm3_finetune.train.manifest import check_folder, describe, folder_problem, write_manifest


def test_publish_moves_the_aside_files_into_place_and_writes_the_manifest_last(tmp_path):
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"old shard")  # from an older final model
    (tmp_path / "model.safetensors").write_bytes(b"old")
    write_manifest(str(tmp_path), 4, describe(str(tmp_path), ["model-00002-of-00002.safetensors",
                                                                        "model.safetensors"]))
    (tmp_path / "run_record.json").write_text("{}")
    aside = final_model.prepare_aside(str(tmp_path))
    with open(os.path.join(aside, "model.safetensors"), "wb") as f:
        f.write(b"new weights")
    os.chmod(os.path.join(aside, "model.safetensors"), 0o600)  # as safetensors writes it
    (tmp_path / final_model.ASIDE_FOLDER / "tokenizer.model").write_bytes(b"pieces")

    assert final_model.publish(str(tmp_path), 8) == ["model.safetensors", "tokenizer.model"]
    manifest = check_folder(str(tmp_path))
    assert manifest["global_step"] == 8 and sorted(manifest["files"]) == ["model.safetensors", "tokenizer.model"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"new weights"
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "model.safetensors", "run_record.json", "tokenizer.model"]


def make_checkpoint(folder, consolidated=True):
    folder.mkdir()
    names = ["config.json", "optimizer.pt", "scheduler.pt", "rng_state_1.pth", "trainer_state.json", "latest",
             "zero_to_fp32.py", "tokenizer.model", "manifest.json"]
    if consolidated:
        names.append("model.safetensors")
    for name in names:
        (folder / name).write_text(name)
    (folder / "global_step8").mkdir()
    (folder / "global_step8" / "mp_rank_00_model_states.pt").write_text("states")


def test_the_final_model_is_a_checkpoint_without_its_resume_state(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-8")
    assert final_model.model_entries(str(tmp_path / "checkpoint-8")) == ["config.json", "model.safetensors",
                                                                          "tokenizer.model"]
    make_checkpoint(tmp_path / "zero3", consolidated=False)  # ZeRO-3 without gathered weights: DeepSpeed's are the model
    assert final_model.model_entries(str(tmp_path / "zero3")) == ["config.json", "global_step8", "latest",
                                                                   "tokenizer.model", "zero_to_fp32.py"]


def test_finishing_from_a_checkpoint_copies_its_model_and_state(tmp_path):
    checkpoint = tmp_path / "checkpoint-8"
    make_checkpoint(checkpoint)
    final_model.finish_from_checkpoint(str(checkpoint), str(tmp_path), 8)
    assert folder_problem(str(tmp_path)) is None
    assert (tmp_path / "trainer_state.json").read_text() == "trainer_state.json"
    assert not (tmp_path / "optimizer.pt").exists() and not (tmp_path / final_model.ASIDE_FOLDER).exists()
    assert os.stat(tmp_path / "model.safetensors").st_ino != os.stat(checkpoint / "model.safetensors").st_ino
