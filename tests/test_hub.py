"""push_to_hub with HfApi patched to record the upload (no network), save_pretrained re-sharding."""

import json

import pytest
from conftest import state_dict_of
from test_card import cook_greedy

from hf_soup import SoupBuilder, SoupError
from hf_soup.cli import main


@pytest.fixture(scope="module")
def soup(tmp_path_factory):
    return cook_greedy(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo / create_branch / create_commit replaced by recorders; online, with a token."""
    from huggingface_hub import HfApi, constants

    calls = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **options):
        calls.append(("create_branch", repo_id, options))

    def create_commit(self, repo_id, operations, **options):
        operations = list(operations)
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
        calls.append(("create_commit", repo_id, {**options, "files": files}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc123"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def test_push_uploads_the_soup_in_one_commit(soup, hub, tmp_path):
    from huggingface_hub import ModelCard

    url = soup.push_to_hub("me/bert-soup", private=True, revision="v1", commit_message="first soup")
    assert url == "https://huggingface.co/me/bert-soup/commit/abc123"
    assert [call[0] for call in hub] == ["create_repo", "create_branch", "create_commit"]
    assert hub[0][2]["private"] is True and hub[0][2]["exist_ok"] is True
    assert hub[1][2]["branch"] == "v1"
    commit = hub[2][2]
    assert commit["revision"] == "v1" and commit["commit_message"] == "first soup"
    expected = sorted(p.name for p in soup.path.iterdir())
    assert sorted(commit["files"]) == expected
    assert {"README.md", "soup.json", "model.safetensors", "config.json", "figure_scores.png"} <= set(expected)
    assert commit["files"]["model.safetensors"] == (soup.path / "model.safetensors").read_bytes()
    (tmp_path / "README.md").write_bytes(commit["files"]["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    report = json.loads(commit["files"]["soup.json"])["report"]
    shown = {r.dataset_split: r.metric_value for r in card.data.eval_results}
    assert shown == {split: round(value, 4) for split, value in report["rows"]["greedy"].items()}  # for people
    assert "model-soup" in card.data.tags


def test_push_generates_a_missing_card_without_touching_the_folder(soup, hub, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    folder = tmp_path / "soup"
    shutil.copytree(soup.path, folder)
    (folder / "README.md").unlink()
    (folder / ".hf_soup-staging-leftover").mkdir()
    assert main(["push", str(folder), "me/other"]) == 0
    files = hub[-1][2]["files"]
    assert "README.md" in files and not (folder / "README.md").exists()
    assert not any(name.startswith(".") for name in files)
    (tmp_path / "card.md").write_bytes(files["README.md"])
    assert ModelCard.load(tmp_path / "card.md").data.model_name == "other"
    assert hub[0][2]["private"] is None and hub[-1][2]["commit_message"] == "Upload greedy soup with hf_soup"


def test_push_errors_are_clear_and_nothing_is_reported_done(soup, hub, monkeypatch, capsys):
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, operations, **options):
        request = httpx2.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit/main")
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(HfApi, "create_commit", refuse)
    with pytest.raises(SoupError, match=r"HTTP 401\): log in with `hf auth login`.*exists but nothing was committed"):
        soup.push_to_hub("me/bert-soup")

    def unreachable(self, repo_id, **options):
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(SoupError, match="cannot reach the Hugging Face Hub.*nothing was pushed"):
        soup.push_to_hub("me/bert-soup")
    with pytest.raises(SoupError, match="not a valid repository id"):
        soup.push_to_hub("me/not a repo")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    assert main(["push", str(soup.path), "me/bert-soup"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-soup: error: the Hub is in offline mode (HF_HUB_OFFLINE=1)") and err.count("\n") == 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(SoupError, match="no Hugging Face token found: log in"):
        soup.push_to_hub("me/bert-soup")
    assert main(["push", str(soup.path.parent), "me/x"]) == 2  # not a soup folder
    assert not [call for call in hub if call[0] == "create_commit"]


def test_save_pretrained_reshards_tensor_by_tensor(tmp_path, make_ingredients):
    from transformers import LlamaForCausalLM

    soup = SoupBuilder(make_ingredients(2), method="uniform").cook(tmp_path / "soup", progress=False)
    copy = soup.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in copy.path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (copy.path / "model.safetensors.index.json").is_file()
    assert copy.record["files"] == sorted([*shards, "model.safetensors.index.json"])
    assert json.loads((copy.path / "soup.json").read_text())["files"] == copy.record["files"]
    original, resharded = state_dict_of(soup.path), state_dict_of(copy.path)
    assert original.keys() == resharded.keys() and all((original[k] == resharded[k]).all() for k in original)
    assert (copy.path / "README.md").read_text() == (soup.path / "README.md").read_text()
    assert LlamaForCausalLM.from_pretrained(copy.path) is not None
    with pytest.raises(SoupError, match="pass overwrite=True"):
        copy.save_pretrained(copy.path)
    single = copy.save_pretrained(copy.path, overwrite=True)  # back to one file, in place
    assert sorted(p.name for p in single.path.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(tmp_path.glob(".hf_soup-staging-*"))
