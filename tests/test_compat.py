"""compat refuses library versions its internals were not tested with, unless told to go on."""

import logging

import pytest
import torch
from transformers import GlmForCausalLM

from conftest import ROOT
from chatglm3_finetune import compat
from chatglm3_finetune.compat import ALLOW_UNTESTED_ENV, TESTED_VERSIONS, UntestedVersionError
from chatglm3_finetune.model.tiny_model import tiny_glm_config


@pytest.fixture
def installed(monkeypatch):
    """Pretends these versions are installed (others stay as they are)."""
    real = compat.installed_version

    def pretend(**versions):
        monkeypatch.setattr(compat, "installed_version",
                            lambda library: versions[library] if library in versions else real(library))
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    compat._warn_once.cache_clear()
    return pretend


def test_the_tested_versions_are_the_pinned_ones():
    pins = dict(line.strip().split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for library, tested in TESTED_VERSIONS.items():
        assert pins[library].startswith(tested + "."), (library, pins[library], tested)


@pytest.mark.parametrize("library", sorted(TESTED_VERSIONS))
def test_an_untested_version_fails_loudly_with_what_to_do(installed, library):
    installed(**{library: "99.1.0"})
    with pytest.raises(UntestedVersionError) as error:
        compat.check_version(library)
    message = str(error.value)
    assert f"{library} 99.1.0 is installed" in message and f"tested with {TESTED_VERSIONS[library]}.x" in message
    assert "pip install -r requirements.txt" in message and f"{ALLOW_UNTESTED_ENV}=1" in message


def test_patch_releases_and_absent_libraries_pass(installed):
    installed(transformers=TESTED_VERSIONS["transformers"] + ".9", bitsandbytes=None)
    compat.check_version("transformers")
    compat.check_version("bitsandbytes")


def test_every_private_use_checks_before_it_reaches_in(installed):
    model = GlmForCausalLM(tiny_glm_config(vocab_size=64))
    installed(transformers="5.99.0")
    for call in (lambda: compat.model_name_or_path(model.config),
                 lambda: compat.attn_implementation(model.config),
                 lambda: compat.cache_argument_name(model),
                 lambda: compat.checkpointed_layers(model),
                 lambda: compat.training_args_file_name()):
        with pytest.raises(UntestedVersionError, match="transformers 5.99.0"):
            call()
    installed(torch="3.0.0")
    with pytest.raises(UntestedVersionError, match="torch 3.0.0"):
        compat.DtypeFollowingModule().to(torch.float16)
    installed(bitsandbytes="0.51.0")
    with pytest.raises(UntestedVersionError, match="bitsandbytes 0.51.0"):
        compat.unpack_4bit_for_training(torch.nn.Linear(2, 2))
    installed(deepspeed="0.20.0")
    with pytest.raises(UntestedVersionError, match="deepspeed 0.20.0"):
        compat.deepspeed_saves_trained_parameters_only(torch.nn.Linear(2, 2))
    # a module no DeepSpeed optimizer trains reaches into nothing: no check, nothing read or set
    assert compat.deepspeed_master_weights(torch.nn.Linear(2, 2)) is None
    assert compat.set_deepspeed_master_weights(torch.nn.Linear(2, 2), {}) is False


def test_a_prefix_model_is_refused_on_an_untested_transformers(installed):
    from chatglm3_finetune.model.ptuning.prefix_model import PrefixTuningModel

    installed(transformers="6.0.0")
    with pytest.raises(UntestedVersionError):
        PrefixTuningModel(GlmForCausalLM(tiny_glm_config(vocab_size=64)), pre_seq_len=2)


def test_the_environment_variable_turns_the_error_into_one_warning(installed, monkeypatch, caplog):
    installed(transformers="5.99.0")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    config = tiny_glm_config(vocab_size=64)
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert compat.attn_implementation(config)
        compat.model_name_or_path(config)
    warnings = [record.message for record in caplog.records if "transformers 5.99.0" in record.message]
    assert len(warnings) == 1 and "check the results" in warnings[0]
