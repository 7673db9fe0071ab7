"""Paths are checked before anything hashes or reads them: a device, a named pipe, a socket, a
broken link (also inside a dataset folder) and a folder where a file belongs each get one error line
naming the path (exit 2), and nothing is opened. Each case is made for real (mkfifo, /dev/zero, a
dangling symlink, a bound socket)."""

import json
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from chatglm3_finetune.data.paths import data_source_problem, file_problem
from chatglm3_finetune.data.records import DataError
from chatglm3_finetune.data.sources import read_source
from chatglm3_finetune.train.run_record import data_digest
from conftest import run_finetune

GOOD = json.dumps({"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})


@contextmanager
def watched_fifo(path):
    """A named pipe at `path`, and a list that gets an entry each time something opened it to read.
    A reader would block forever; a helper opens the other end to release it (so a test fails rather
    than hangs) and counts it."""
    os.mkfifo(path)
    readers, done = [], threading.Event()

    def release_readers():
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # fails with ENXIO while nobody reads
                readers.append(time.monotonic())
            except OSError:
                pass
            done.wait(0.05)

    helper = threading.Thread(target=release_readers, daemon=True)
    helper.start()
    try:
        yield readers
    finally:
        done.set()
        helper.join()


@contextmanager
def deadline(seconds: float):
    """TimeoutError in this (main) thread after `seconds`: a reader stuck on /dev/zero fails the test
    instead of hanging it."""
    def expire(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def saved_dataset(folder):
    import datasets

    datasets.Dataset.from_list([json.loads(GOOD)] * 2).save_to_disk(str(folder))
    return str(folder)


# ---- what each kind of path is called ---------------------------------------------------------------------

def test_each_kind_of_path_is_named(tmp_path):
    regular = tmp_path / "data.jsonl"
    regular.write_text(GOOD + "\n")
    (tmp_path / "link.jsonl").symlink_to(regular)
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "data.sock"))
    try:
        with watched_fifo(tmp_path / "fifo.jsonl") as readers:
            problems = {name: file_problem(str(tmp_path / name)) for name in
                        ("data.jsonl", "link.jsonl", "dangling.jsonl", "missing.jsonl", "fifo.jsonl", "data.sock")}
            problems["."] = file_problem(str(tmp_path))
    finally:
        sock.close()
    assert problems["data.jsonl"] is None and problems["link.jsonl"] is None
    assert problems["dangling.jsonl"] == (f"{tmp_path / 'dangling.jsonl'}: a broken symbolic link (it points to "
                                          f"{tmp_path / 'gone.jsonl'}, which does not exist); the data file must be "
                                          f"a regular file")
    assert problems["missing.jsonl"] == f"{tmp_path / 'missing.jsonl'}: no such data file"
    assert problems["fifo.jsonl"] == (f"{tmp_path / 'fifo.jsonl'}: a named pipe (FIFO); the data file must be a "
                                      f"regular file")
    assert problems["data.sock"] == f"{tmp_path / 'data.sock'}: a socket; the data file must be a regular file"
    assert problems["."] == f"{tmp_path}: a folder; the data file must be a regular file"
    assert file_problem("/dev/zero") == "/dev/zero: a character device; the data file must be a regular file"
    assert readers == []


def test_a_folder_must_be_a_saved_dataset_of_regular_files(tmp_path):
    folder = saved_dataset(tmp_path / "dataset")
    assert data_source_problem(folder) is None and len(read_source(folder)) == 2
    assert data_source_problem(str(tmp_path)).endswith("not a dataset folder (a folder must be saved by datasets' "
                                                       "save_to_disk; give a .jsonl, .json or .parquet file otherwise)")
    os.symlink(os.path.join(folder, "gone.arrow"), os.path.join(folder, "extra.arrow"))
    problem = data_source_problem(folder)
    assert problem.startswith(f"{folder}/extra.arrow: a broken symbolic link (it points to {folder}/gone.arrow")
    assert problem.endswith(f"inside the dataset folder {folder}, whose every entry must be a regular file or a folder")
    with pytest.raises(DataError, match="extra.arrow: a broken symbolic link"):
        read_source(folder)


def test_a_folder_that_is_no_dataset_is_refused_before_anything_in_it_is_read(tmp_path):
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(GOOD + "\n")
    with watched_fifo(folder / "pipe") as readers:
        with pytest.raises(DataError, match="not a dataset folder"):
            read_source(str(folder))
        with pytest.raises(DataError, match="not a dataset folder"):
            data_digest(str(folder))
    assert readers == []


def test_a_named_pipe_inside_a_dataset_folder_is_refused_unread(tmp_path):
    folder = saved_dataset(tmp_path / "dataset")
    with watched_fifo(os.path.join(folder, "pipe.arrow")) as readers:
        for read in (read_source, data_digest):
            with pytest.raises(DataError) as e:
                read(folder)
            assert str(e.value).startswith(f"{folder}/pipe.arrow: a named pipe (FIFO), inside the dataset folder")
    assert readers == []


def test_the_run_record_hashes_only_checked_paths(tmp_path):
    """data_digest used to open whatever it was given: a named pipe blocked it, /dev/zero never ended."""
    with watched_fifo(tmp_path / "data.jsonl") as readers:
        with pytest.raises(DataError, match="a named pipe"):
            data_digest(str(tmp_path / "data.jsonl"))
    assert readers == []
    for read in (data_digest, read_source):
        with deadline(20), pytest.raises(DataError, match="^/dev/zero: a character device"):
            read("/dev/zero")
    regular = tmp_path / "ok.jsonl"
    regular.write_text(GOOD + "\n")
    assert len(data_digest(str(regular))) == 16


# ---- the programs: exit 2 with the path, at once ----------------------------------------------------------

def finetune_args(tiny_model_dir, tmp_path, *data_flags):
    return ("--model_name_or_path", tiny_model_dir, "--train_format", "multi-turn", *data_flags,
            "--output_dir", str(tmp_path / "out"), "--do_train", "--use_cpu", "--report_to", "none",
            "--preprocessing_cache_dir", str(tmp_path / "cache"))


def test_finetune_with_dev_zero_as_data_exits_2_at_once(tiny_model_dir, tmp_path):
    result = run_finetune(*finetune_args(tiny_model_dir, tmp_path, "--train_file", "/dev/zero"), check=False,
                          timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == ("error: --train_file /dev/zero: a character device; the data file must be a "
                                     "regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--train_file", "--validation_file"])
def test_finetune_with_a_named_pipe_as_data_exits_2_unread(tiny_model_dir, tmp_path, finetune_in_process, flag):
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD + "\n")
    pipe = tmp_path / "pipe.jsonl"
    data_flags = ["--train_file", str(pipe)] if flag == "--train_file" else [
        "--train_file", str(good), "--validation_file", str(pipe), "--do_eval"]
    with watched_fifo(pipe) as readers:
        result = finetune_in_process(*finetune_args(tiny_model_dir, tmp_path, *data_flags))
    assert result.returncode == 2 and readers == []
    assert result.stderr.strip() == f"error: {flag} {pipe}: a named pipe (FIFO); the data file must be a regular file"


def test_finetune_with_a_broken_link_in_a_dataset_folder_exits_2(tiny_model_dir, tmp_path, finetune_in_process):
    folder = saved_dataset(tmp_path / "dataset")
    os.symlink("/nonexistent/data.arrow", os.path.join(folder, "more.arrow"))
    result = finetune_in_process(*finetune_args(tiny_model_dir, tmp_path, "--train_file", folder))
    assert result.returncode == 2
    last = result.stderr.strip().split("\n")[-1]  # after the progress bar of saving the dataset
    assert last.startswith(f"error: --train_file {folder}/more.arrow: a broken symbolic link (it points to "
                           f"/nonexistent/data.arrow, which does not exist)")
    assert "Traceback" not in result.stderr


def test_finetune_with_a_plain_folder_as_data_exits_2_unread(tiny_model_dir, tmp_path, finetune_in_process):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(GOOD + "\n")
    with watched_fifo(folder / "pipe") as readers:
        result = finetune_in_process(*finetune_args(tiny_model_dir, tmp_path, "--train_file", str(folder)))
    assert result.returncode == 2 and readers == []
    assert result.stderr.strip() == (f"error: --train_file {folder}: not a dataset folder (a folder must be saved by "
                                     f"datasets' save_to_disk; give a .jsonl, .json or .parquet file otherwise)")


def test_the_other_readers_refuse_a_named_pipe(tmp_path, tiny_model_dir, capsys):
    """The preview, inference --input / --tools and the converters: exit 2 with the path, unread."""
    import inference
    import preprocess_utils
    from chatglm3_finetune.data.converters import advertise_gen, tool_alpaca

    pipe = tmp_path / "pipe.json"
    runs = {
        "preview": lambda: preprocess_utils.main(["--tokenizer", tiny_model_dir, "--train_format", "auto",
                                                  "--data", str(pipe)]),
        "inference --input": lambda: inference.main(["--model", tiny_model_dir, "--input", str(pipe),
                                                     "--output", str(tmp_path / "preds.jsonl")]),
        "inference --tools": lambda: inference.main(["--model", tiny_model_dir, "--tools", str(pipe),
                                                     "--prompt", "Hi"]),
        "advertise_gen": lambda: advertise_gen.main(["--path", str(pipe), "--output", str(tmp_path / "a.jsonl")]),
        "tool_alpaca": lambda: tool_alpaca.main(["--path", str(pipe), "--output", str(tmp_path / "t.jsonl")]),
    }
    expected = {"preview": f"error: {pipe}: a named pipe (FIFO); the data file must be a regular file",
                "inference --input": f"error: {pipe}: a named pipe (FIFO); the data file must be a regular file",
                "inference --tools": f"error: --tools {pipe}: a named pipe (FIFO); the tools file must be a "
                                     f"regular file",
                "advertise_gen": f"error: --path {pipe}: a named pipe (FIFO); the data file must be a regular file",
                "tool_alpaca": f"error: --path {pipe}: a named pipe (FIFO); the data file must be a regular file"}
    with watched_fifo(pipe) as readers:
        for name, run in runs.items():
            try:
                code = run()
            except SystemExit as stop:  # the converters stop from their argument parser
                code = stop.code
            assert code == 2, name
            assert capsys.readouterr().err.strip() == expected[name], name
    assert readers == []


def test_an_options_file_that_is_a_folder_or_a_pipe_is_refused(tmp_path, finetune_in_process):
    folder = tmp_path / "args.yaml"
    folder.mkdir()
    result = finetune_in_process(str(folder))
    assert (result.returncode, result.stderr.strip()) == (
        2, f"error: {folder}: a folder; the options file must be a regular file")
    with watched_fifo(tmp_path / "args.json") as readers:
        result = finetune_in_process(str(tmp_path / "args.json"))
    assert result.returncode == 2 and readers == []
    assert result.stderr.strip() == f"error: {tmp_path / 'args.json'}: a named pipe (FIFO); the options file must be " \
                                    f"a regular file"
