"""The catalogue of what a user can get wrong: each row feeds one bad input through the public API or the
`fm-indexer` command and checks that it fails early with one line saying what was wrong and what to do."""

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import fm_transformers as fm
from fm_indexer import main
from fm_transformers import locate
from fm_transformers.tiny import tiny_deepseek_v4, tiny_deepseek_v4_config
from tests.conftest import greedy, random_prompt


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def test_model_that_is_not_deepseek_v4_is_refused(llama, model):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        fm.attach_memory_indexer(llama, indexer)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        fm.OffloadedLookaheadCache(llama)
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        llama.generate(torch.randint(0, 99, (1, 5)), max_new_tokens=2, cache_implementation="lsa")
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        fm.MemoryIndexerModel.from_backbone(llama, layers=[0])


def test_indexer_layer_that_is_not_csa_is_refused(model):
    with pytest.raises(ValueError, match=r"not CSA layers.*\[2, 4, 6, 7\]"):
        fm.MemoryIndexerModel.from_backbone(model, layers=[3], num_heads=4, rank=8)


def test_a_backbone_without_csa_layers_has_no_default_indexer_layers():
    sliding_only = tiny_deepseek_v4_config(layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match=r"^this backbone has no CSA layers \(layer_types\): a memory indexer needs at least one$"):
        fm.MemoryIndexerModel.from_backbone(sliding_only, num_heads=4, rank=8)


def test_indexer_made_for_other_dimensions_is_refused(model):
    other = tiny_deepseek_v4(hidden_size=48)
    indexer = fm.MemoryIndexerModel.from_backbone(other, layers=[2], num_heads=4, rank=8)
    with pytest.raises(ValueError, match="hidden_size=48.*model has hidden_size=64: load the indexer made for this backbone"):
        fm.attach_memory_indexer(model, indexer)
    assert fm.attached_memory_indexer(model) is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tau": 0}, "tau must be a positive integer"),
        ({"tau": -3}, "tau must be a positive integer"),
        ({"threshold": 1.5}, r"threshold must lie in \[0, 1\]"),
        ({"threshold": -0.1}, r"threshold must lie in \[0, 1\]"),
        ({"resident_budget": 0}, "resident_budget"),
        ({"resident_budget": 1.5}, "resident_budget"),
        ({"pool_dtype": "int8"}, "pool_dtype"),
        ({"refresh_layers": 2}, "refresh_layers must be a non-empty list of layer indices"),
        ({"refresh_layers": [3]}, r"refresh_layers \[3\] are not CSA layers"),
        ({"taus": 8}, r"unknown cache_config key\(s\) \['taus'\]"),
    ],
)
def test_bad_cache_config_is_refused_by_generate(indexed_model, options, message):
    with pytest.raises(ValueError, match=message):
        indexed_model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa", cache_config=options)


def test_generate_without_attached_indexer_names_attach_memory_indexer(model):
    with pytest.raises(ValueError, match="attach_memory_indexer"):
        model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa")


def test_indexer_layers_without_memory_indexer_are_refused(indexed_model):
    with pytest.raises(ValueError, match=r"indexer_layers \[6\] have no memory indexer"):
        indexed_model.generate(random_prompt(20), max_new_tokens=2, cache_implementation="lsa", cache_config={"indexer_layers": [6]})


# --- where an indexer or a backbone is: a local directory or a Hub repo (fm_transformers.locate) ---


@pytest.fixture
def hub_never_asked(monkeypatch):
    """Fails the test if anything asks the Hub."""

    class NoHub:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the Hub was asked")

    monkeypatch.setattr(locate, "HfApi", NoHub)


@pytest.fixture
def hub_unreachable(monkeypatch):
    """The Hub cannot be reached, as on a machine without a network."""

    class DeadHub:
        def __init__(self, *args, **kwargs):
            pass

        def model_info(self, *args, **kwargs):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(locate, "HfApi", DeadHub)


@pytest.fixture
def missing_path(request, tmp_path, monkeypatch):
    """A path that does not exist, spelled absolute, ./, ../ or ~/."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path))
    return request.param.format(tmp=tmp_path)


MISSING_PATHS = ["{tmp}/nope-indexer", "./nope-indexer", "../nope-indexer", "~/nope-indexer"]
UNREACHABLE = "no local directory runs/indexr, and the Hub repo runs/indexr could not be reached"


def error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("missing_path", MISSING_PATHS, indirect=True)
def test_attach_of_a_missing_local_path_says_no_such_directory(model, missing_path, hub_never_asked):
    with pytest.raises(FileNotFoundError, match=f"^no such directory: {re.escape(missing_path)}$"):
        fm.attach_memory_indexer(model, missing_path)


@pytest.mark.parametrize("missing_path", MISSING_PATHS, indirect=True)
def test_auto_lsa_model_of_a_missing_local_path_says_no_such_directory(missing_path, hub_never_asked):
    with pytest.raises(FileNotFoundError, match=f"^no such directory: {re.escape(missing_path)}$"):
        fm.AutoLSAModelForCausalLM.from_pretrained(missing_path)


def test_a_name_that_is_neither_a_directory_nor_a_repo_id_says_both(model, hub_never_asked):
    with pytest.raises(FileNotFoundError, match=r"^no such directory: my indexer \(nor is it a Hub repo id"):
        fm.attach_memory_indexer(model, "my indexer")


def test_a_file_given_for_an_indexer_directory_is_refused(model, tmp_path, hub_never_asked):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="model.safetensors is a file, not a directory"):
        fm.attach_memory_indexer(model, str(tmp_path / "model.safetensors"))


def test_a_mistyped_repo_id_offline_names_both_possibilities_without_asking_the_hub(model, monkeypatch, tmp_path, hub_never_asked):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locate, "is_offline_mode", lambda: True)
    with pytest.raises(FileNotFoundError, match=f"^{UNREACHABLE}: offline"):
        fm.attach_memory_indexer(model, "runs/indexr")


def test_a_mistyped_repo_id_with_no_network_names_both_possibilities(model, monkeypatch, tmp_path, hub_unreachable):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"^{UNREACHABLE} \\(ConnectionError: Name or service not known\\)"):
        fm.AutoLSAModelForCausalLM.from_pretrained("runs/indexr")


def test_an_indexer_of_a_model_made_in_code_needs_base_model(model, tmp_path, hub_never_asked):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8, base_model_name_or_path="fm_transformers.tiny(seed=0)")
    indexer.save_pretrained(tmp_path / "indexer")
    with pytest.raises(FileNotFoundError, match=r"names its backbone 'fm_transformers.tiny\(seed=0\)', which cannot be loaded .*pass base_model="):
        fm.AutoLSAModelForCausalLM.from_pretrained(str(tmp_path / "indexer"))


@pytest.mark.parametrize("command", ["eval", "push"])
def test_cli_with_a_missing_indexer_directory_says_no_such_directory(command, tmp_path, caplog, hub_never_asked):
    missing = str(tmp_path / "nope-indexer")
    options = ["--data", str(tmp_path / "labels")] if command == "eval" else ["--repo-id", "someone/x", "--local-dir", str(tmp_path / "repo")]
    assert main([command, "--indexer", missing, *options]) == 2
    assert error_lines(caplog) == [f"no such directory: {missing}"]


def test_cli_with_a_mistyped_repo_id_offline_fails_at_once_without_a_traceback(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "fm_indexer", "eval", "--indexer", "runs/indexr", "--data", "labels"]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    assert f"ERROR fm-indexer: {UNREACHABLE}: offline" in result.stderr


# --- the fm-indexer command line ---


def test_cli_mistyped_option_answers_with_usage_and_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--indexer", "x", "--data", "y", "--treshold", "0.3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "fm-indexer eval: error: unrecognized arguments: --treshold 0.3"


@pytest.mark.parametrize("checkpoint", ["{tmp}/top3_R930_joint.pt", "./nope.pt"])
def test_cli_convert_of_a_missing_checkpoint_file_says_no_such_file(checkpoint, tmp_path, caplog, hub_never_asked):
    checkpoint = checkpoint.format(tmp=tmp_path)
    command = ["convert", "--official-checkpoint", checkpoint, "--backbone", "tiny", "--output", str(tmp_path / "out")]
    assert main(command) == 2
    assert error_lines(caplog) == [f"no such file: {checkpoint}"]


def test_cli_convert_of_a_directory_without_the_checkpoint_names_the_file_it_looked_for(tmp_path, caplog, hub_never_asked):
    command = ["convert", "--official-checkpoint", str(tmp_path), "--backbone", "tiny", "--output", str(tmp_path / "out")]
    assert main(command) == 2
    assert error_lines(caplog) == [f"{tmp_path} has no checkpoints/top3_R930_joint.pt: pass the checkpoint file or its path inside {tmp_path}"]


# --- publishing an indexer (fm-indexer push) ---


def test_card_of_an_indexer_for_a_model_made_in_code_says_there_is_no_backbone_to_load(model, tmp_path):
    indexer = fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8, base_model_name_or_path="fm_transformers.tiny(seed=0)")
    indexer.save_pretrained(tmp_path / "indexer")
    push = ["push", "--indexer", str(tmp_path / "indexer"), "--repo-id", "someone/fm-indexer-tiny"]
    assert main([*push, "--local-dir", str(tmp_path / "repo")]) == 0
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "There is no backbone to download" in card and "`fm_transformers.tiny(seed=0)`, which is not a Hub repo" in card
    assert "from_pretrained(" not in card and "\nbase_model:" not in card


def test_cli_push_with_a_missing_card_template_names_it(model, tmp_path, caplog):
    fm.MemoryIndexerModel.from_backbone(model, layers=[2], num_heads=4, rank=8).save_pretrained(tmp_path / "indexer")
    push = ["push", "--indexer", str(tmp_path / "indexer"), "--repo-id", "someone/x", "--local-dir", str(tmp_path / "repo")]
    assert main([*push, "--card-template", str(tmp_path / "card.md")]) == 2
    assert error_lines(caplog) == [f"card template {tmp_path / 'card.md'} not found: pass --card-template with an existing file"]


def test_a_cache_built_for_another_model_is_refused_before_any_layer_runs(model):
    three_layers = tiny_deepseek_v4(seed=0, layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"])
    cache = fm.OffloadedLookaheadCache(three_layers, policy=fm.KeepAllPolicy())
    with pytest.raises(ValueError, match=r"built for a model with 3 layers \(1 CSA\), the model has 8 \(4 CSA\)"):
        model.generate(random_prompt(20), max_new_tokens=2, past_key_values=cache, pad_token_id=0)
    with pytest.raises(ValueError, match="build the cache with this model"):
        model(random_prompt(20), past_key_values=cache)


def test_cache_config_without_cache_implementation_is_refused(model):
    with pytest.raises(ValueError, match="does nothing without a cache implementation: add cache_implementation='lsa'"):
        model.generate(random_prompt(20), max_new_tokens=2, cache_config={"tau": 4}, pad_token_id=0)


def test_lsa_without_use_cache_is_one_error_and_no_transformers_warning(model, caplog, monkeypatch):
    hf_logging.warning_once.cache_clear()  # a warning already given in this process would not be given again
    monkeypatch.setattr(hf_logging.get_logger("transformers"), "propagate", True)  # so that caplog sees it
    with pytest.raises(ValueError, match="^cache_implementation='lsa' needs use_cache=True: drop use_cache=False$"):
        model.generate(random_prompt(20), max_new_tokens=2, pad_token_id=0, use_cache=False, cache_implementation="lsa")
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_an_empty_prompt_is_refused_before_the_model_runs(model):
    with pytest.raises(ValueError, match="the prompt is empty"):
        model.generate(
            random_prompt(20)[:, :0], max_new_tokens=2, pad_token_id=0, cache_implementation="lsa",
            cache_config={"policy": fm.KeepAllPolicy()},
        )


def test_threshold_beside_an_explicit_policy_is_refused(model):
    with pytest.raises(ValueError, match=r"cache option\(s\) \['threshold'\] configure the default memory-indexer policy"):
        fm.OffloadedLookaheadCache(model, {"threshold": 0.3}, policy=fm.KeepAllPolicy())


def test_prefill_chunk_size_must_be_a_positive_integer(model):
    with pytest.raises(ValueError, match="prefill_chunk_size must be a positive integer"):
        fm.OffloadedLookaheadCache(model, {"prefill_chunk_size": 0}, policy=fm.KeepAllPolicy())


def test_an_indexer_trained_for_another_tau_warns(indexed_model, caplog):
    fm.attached_memory_indexer(indexed_model).config.tau = 16
    try:
        with caplog.at_level(logging.WARNING):
            fm.OffloadedLookaheadCache(indexed_model, {"tau": 8})
    finally:
        fm.attached_memory_indexer(indexed_model).config.tau = None
    assert "trained for tau=16, the cache runs tau=8" in caplog.text


def test_cuda_graph_option_that_is_not_a_bool_is_refused(model):
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        greedy(model, random_prompt(8), max_new_tokens=2, cache_implementation="lsa", cache_config={"cuda_graph": "yes", "policy": fm.KeepAllPolicy()})
