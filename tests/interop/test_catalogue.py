"""The local model catalogue, against a fake Hub: a `download` that copies local repos the way snapshot_download
does (only files matching allow_patterns). Never the network."""

import importlib.util
import inspect
import json
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import errors
from safetensors.torch import save_file

from yunque.config import preset
from yunque.interop.catalogue import (
    ALLOW_PATTERNS,
    catalogue_dir,
    format_table,
    list_models,
    pull,
    remove,
    resolve,
    safetensors_dtype,
)
from yunque.model.gpt import GPT
from yunque.modeldir import save_model
from yunque.tokenizer.bpe import byte_tokenizer

TOK = byte_tokenizer()
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# by hand: per layer attention 64*(64+32+32) + 64*64, SwiGLU 3*64*128, two norms; final norm; embedding and head
LLAMA_PARAMS = 2 * (64 * 128 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 2 * 256 * 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def size_of(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """Local stand-ins for Hub repos, one folder per repo id."""
    hub = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=32))
    save_model(hub / "me/tiny", model, TOK)

    llama = hub / "org/llama"  # an HF dir in bf16 with the pickles and extras a real repo carries beside it
    llama.mkdir(parents=True)
    (llama / "config.json").write_text(json.dumps(LLAMA))
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, str(llama / "model.safetensors"))
    TOK.save(llama)
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "consolidated.pt", "onnx/model.onnx"):
        (llama / name).parent.mkdir(exist_ok=True)
        (llama / name).write_bytes(b"\0" * 1000)

    sharded = hub / "org/sharded"  # an f16 model in two shards, the biggest tensors f16, a small one f32
    sharded.mkdir(parents=True)
    (sharded / "config.json").write_text(json.dumps({**LLAMA, "model_type": "qwen2"}))
    shards = {"model-00001-of-00002.safetensors": {"a": torch.zeros(8, 8, dtype=torch.float16),
                                                    "b": torch.zeros(4, dtype=torch.float32)},
              "model-00002-of-00002.safetensors": {"c": torch.zeros(8, dtype=torch.float16)}}
    for name, tensors in shards.items():
        save_file(tensors, str(sharded / name))
    index = {"weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    TOK.save(sharded)

    gemma = hub / "org/gemma"  # an architecture yunque does not run
    gemma.mkdir(parents=True)
    (gemma / "config.json").write_text(json.dumps({**LLAMA, "model_type": "gemma", "max_position_embeddings": 8192}))
    save_file({"w": torch.zeros(4, 4, dtype=torch.bfloat16)}, str(gemma / "model.safetensors"))
    TOK.save(gemma)

    pickles = hub / "old/pickles"  # .bin weights only
    pickles.mkdir(parents=True)
    (pickles / "config.json").write_text(json.dumps(LLAMA))
    (pickles / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    TOK.save(pickles)
    return hub


class FakeHub:
    """A `download` with snapshot_download's signature that copies a local repo, honouring allow_patterns."""

    def __init__(self, hub: Path, error: BaseException | None = None):
        self.hub, self.error, self.calls = hub, error, []

    def __call__(self, repo_id, *, revision=None, token=None, allow_patterns=None, local_dir=None, **kwargs):
        self.calls.append(inspect.signature(self.__call__).bind(repo_id, revision=revision, token=token,
                                                                allow_patterns=allow_patterns, local_dir=local_dir,
                                                                **kwargs))
        if self.error is not None:
            raise self.error
        src = self.hub / repo_id
        for path in src.rglob("*"):
            rel = path.relative_to(src).as_posix()
            if path.is_file() and any(fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / rel).write_bytes(path.read_bytes())
        return str(local_dir)


def hub_error(cls, message: str) -> BaseException:
    error = cls.__new__(cls)  # the real constructor wants an HTTP response
    error.args = (message,)
    return error


def test_allow_patterns_fetch_safetensors_and_tokenizers_never_pickles():
    def fetched(name):
        return any(fnmatch(name, p) for p in ALLOW_PATTERNS)

    for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "consolidated.pt",
                 "tf_model.h5", "flax_model.msgpack", "model.ckpt", "training_args.bin", "onnx/model.onnx"):
        assert not fetched(name), name
    for name in ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "model-00001-of-00004.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        assert fetched(name), name


def test_pull_then_list_shows_dtype_size_and_parameters(hub, tmp_path):
    root = tmp_path / "models"
    fake = FakeHub(hub)
    tiny_dir = pull("me/tiny", root=root, download=fake)
    llama_dir = pull("org/llama", root=root, revision="v1", token="hf_x", download=fake)
    assert (tiny_dir, llama_dir) == (root / "me--tiny", root / "org--llama")
    from huggingface_hub import snapshot_download
    for call in fake.calls:  # what pull passes is a valid call of the real function
        inspect.signature(snapshot_download).bind(*call.args, **call.kwargs)
    assert fake.calls[1].arguments | {"allow_patterns": None} == {
        "repo_id": "org/llama", "revision": "v1", "token": "hf_x", "allow_patterns": None, "local_dir": llama_dir}
    assert not (llama_dir / "pytorch_model.bin").exists() and not (llama_dir / "onnx").exists()

    rows = {r["name"]: r for r in list_models(root)}
    assert list(rows) == ["me/tiny", "org/llama"]
    tiny, llama = rows["me/tiny"], rows["org/llama"]
    model = GPT(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=32))
    assert tiny == {"name": "me/tiny", "family": "yunque (llama-style)", "dtype": "f32", "context": 32,
                    "parameters": sum(p.numel() for p in model.parameters()), "size": size_of(hub / "me/tiny"),
                    "path": tiny_dir, "problem": None}
    fetched = [p for p in (hub / "org/llama").iterdir() if p.name in ("config.json", "model.safetensors",
                                                                        "tokenizer.json")]
    assert llama == {"name": "org/llama", "family": "llama", "dtype": "bf16", "context": 128,
                     "parameters": LLAMA_PARAMS, "size": sum(p.stat().st_size for p in fetched), "path": llama_dir,
                     "problem": None}


def test_list_sharded_unsupported_and_incomplete_dirs(hub, tmp_path):
    root = tmp_path / "models"
    fake = FakeHub(hub)
    pull("org/sharded", root=root, download=fake)
    pull("org/gemma", root=root, download=fake)
    (root / "broken--download").mkdir()
    rows = {r["name"]: r for r in list_models(root)}
    assert rows["org/sharded"]["dtype"] == "f16"  # most elements, from the first shard's header
    assert rows["org/sharded"]["family"] == "qwen2"
    assert (rows["org/gemma"]["family"], rows["org/gemma"]["parameters"], rows["org/gemma"]["context"]) == \
        ("gemma (unsupported)", None, 8192)
    assert (rows["broken/download"]["family"], rows["broken/download"]["dtype"]) == ("? (no config.json)", None)
    assert list_models(tmp_path / "nowhere") == []


BAD_ENTRIES = {
    "bad--list": ("? (bad config.json)", "holds a JSON list, not an object", lambda d: (d / "config.json").write_text(
        "[1, 2]")),
    "bad--json": ("? (bad config.json)", "not valid JSON", lambda d: (d / "config.json").write_text("{")),
    "bad--heads": ("llama (unsupported)", "config.json: num_attention_heads must be a positive integer, got 0",
                   lambda d: edit(d, num_attention_heads=0)),
    "bad--nullheads": ("llama (unsupported)", "config.json: num_attention_heads is missing",
                       lambda d: edit(d, num_attention_heads=None)),
    "bad--strings": ("llama (unsupported)", "config.json: hidden_size must be a positive integer, got '64'",
                     lambda d: edit(d, hidden_size="64")),
    "bad--vocab": ("llama (unsupported)", "config.json: vocab_size=17179869184 is larger than yunque allows",
                   lambda d: edit(d, vocab_size=2**34)),
    "bad--arch": ("llama (unsupported)", "config.json: hidden_size is missing",
                  lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')),
    "bad--escape": ("? (unreadable)", "weight_map names the shard '../../etc/passwd', which is not a file of",
                    lambda d: escape(d, "../../etc/passwd")),
    "bad--absolute": ("? (unreadable)", "weight_map names the shard '/etc/passwd'", lambda d: escape(d, "/etc/passwd")),
    "bad--yunque": ("? (bad config.json)", "config.json: n_head must be an integer, got '4'",
                    lambda d: edit(d, n_head="4")),
}


def edit(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def escape(model_dir: Path, shard: str) -> None:
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))


def test_list_marks_bad_entries_and_still_lists_the_good_ones(hub, tmp_path):
    root = tmp_path / "models"
    fake = FakeHub(hub)
    pull("me/tiny", root=root, download=fake)
    pull("org/llama", root=root, download=fake)
    for name, (_, _, damage) in BAD_ENTRIES.items():
        shutil.copytree(root / ("me--tiny" if name == "bad--yunque" else "org--llama"), root / name)
        damage(root / name)
    rows = {r["name"]: r for r in list_models(root)}
    assert rows["me/tiny"]["problem"] is None and rows["me/tiny"]["parameters"] > 0
    assert rows["org/llama"]["problem"] is None and rows["org/llama"]["parameters"] == LLAMA_PARAMS
    for name, (family, problem, _) in BAD_ENTRIES.items():
        row = rows[name.replace("--", "/")]
        assert row["family"] == family, name
        assert problem in row["problem"] and "\n" not in row["problem"], name
    table = format_table(list(rows.values()))
    assert "\nbad/heads: config.json: num_attention_heads must be a positive integer, got 0" in table


def test_pull_a_repo_with_a_missing_shard_names_it(hub, tmp_path):
    class DropShard(FakeHub):
        def __call__(self, *args, **kwargs):
            out = Path(super().__call__(*args, **kwargs))
            (out / "model-00002-of-00002.safetensors").unlink()
            return str(out)

    with pytest.raises(ValueError, match=r"org/sharded has no model-00002-of-00002.safetensors; the files"):
        pull("org/sharded", root=tmp_path, download=DropShard(hub))


def test_safetensors_dtype_reads_only_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    assert safetensors_dtype(path) == "bf16"
    with open(path, "r+b") as f:  # the tensor bytes do not matter: only the header is read
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff" * 4)
    assert safetensors_dtype(path) == "bf16"
    path.write_bytes(b"\xff" * 8 + b"{}")  # a header length larger than the file
    assert safetensors_dtype(path) is None
    assert safetensors_dtype(tmp_path / "missing.safetensors") is None


def test_format_table_aligns_columns_with_human_units():
    rows = [{"name": "openai-community/gpt2", "family": "gpt2", "parameters": 124_439_808, "dtype": "f32",
             "size": int(487.2 * 2**20), "context": 1024, "path": Path("x")},
            {"name": "me/tiny", "family": "gemma (unsupported)", "parameters": None, "dtype": None, "size": 900,
             "context": None, "path": Path("y")}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "PARAMS", "DTYPE", "SIZE", "CONTEXT"]
    assert lines[1].split() == ["openai-community/gpt2", "gpt2", "124.4M", "f32", "487.2", "MiB", "1024"]
    assert lines[2].split() == ["me/tiny", "gemma", "(unsupported)", "?", "?", "900", "B", "?"]
    family = lines[0].index("FAMILY")
    assert lines[1][family:].startswith("gpt2 ") and lines[2][family:].startswith("gemma ")
    assert len({len(line) for line in lines}) == 1  # the last column is right-aligned


def test_resolve_by_path_then_by_name(hub, tmp_path, monkeypatch):
    root = tmp_path / "models"
    model_dir = pull("me/tiny", root=root, download=FakeHub(hub))
    assert resolve("me/tiny", root=root) == model_dir
    assert resolve("me--tiny", root=root) == model_dir
    assert resolve(str(hub / "org/llama"), root=root) == hub / "org/llama"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "tiny").mkdir(parents=True)  # an existing directory wins over a catalogue name
    assert resolve("me/tiny", root=root) == Path("me/tiny")
    with pytest.raises(ValueError, match=r"^no model dir or catalogue model named nope/nope; `yunque models` lists"):
        resolve("nope/nope", root=root)
    with pytest.raises(ValueError, match="no model dir or catalogue model named ../x"):
        resolve("../x", root=root)


def test_remove(hub, tmp_path):
    root = tmp_path / "models"
    fake = FakeHub(hub)
    pull("me/tiny", root=root, download=fake)
    pull("org/llama", root=root, download=fake)
    assert remove("me/tiny", root=root) == root / "me--tiny"
    assert not (root / "me--tiny").exists()
    assert remove("org--llama", root=root) == root / "org--llama"
    assert list_models(root) == []
    with pytest.raises(ValueError, match="the catalogue is empty"):
        remove("org/llama", root=root)


def test_remove_unknown_lists_local_models(hub, tmp_path):
    root = tmp_path / "models"
    pull("me/tiny", root=root, download=FakeHub(hub))
    pull("org/llama", root=root, download=FakeHub(hub))
    with pytest.raises(ValueError, match=r"^no model me/other in the catalogue at .*; local models: me/tiny, "
                                         r"org/llama$"):
        remove("me/other", root=root)


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "a/../../x", "a\\..\\x", ""])
def test_remove_refuses_paths_that_escape_the_catalogue(tmp_path, name):
    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="points outside the catalogue"):
        remove(name, root=root)
    assert (tmp_path / "x").is_dir()


def test_remove_refuses_a_symlink_out_of_the_catalogue(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "precious").mkdir()
    (root / "me--link").symlink_to(tmp_path / "precious")
    with pytest.raises(ValueError, match="points outside the catalogue"):
        remove("me/link", root=root)
    assert (tmp_path / "precious").is_dir()


def connection_errors():
    found = [errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified "
                                            "revision on the local disk and outgoing traffic has been disabled. To "
                                            "enable repo look-ups and downloads online, set 'HF_HUB_OFFLINE=0'.\n"
                                            "second line"),
             OSError("[Errno -3] Temporary failure in name resolution")]
    for module in ("httpx", "httpx2", "requests"):  # whichever HTTP library this huggingface_hub uses
        if importlib.util.find_spec(module):
            found.append(importlib.import_module(module).ConnectionError("[Errno 111] Connection refused")
                         if module == "requests" else importlib.import_module(module).ConnectError("refused"))
    return found


@pytest.mark.parametrize("error", connection_errors(), ids=lambda e: type(e).__module__ + "." + type(e).__name__)
def test_no_network_gives_one_line(hub, tmp_path, error):
    with pytest.raises(ValueError) as e:
        pull("org/llama", root=tmp_path, download=FakeHub(hub, error))
    message = str(e.value)
    assert "\n" not in message and len(message) < 250
    assert message.startswith("cannot reach the Hugging Face Hub to download org/llama (")
    assert message.endswith("); check the network, or pass a local model directory instead")


def test_the_real_download_offline_gives_the_same_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ValueError, match=r"^cannot reach the Hugging Face Hub to download org/llama \(offline mode: "
                                         r"HF_HUB_OFFLINE is set\); check the network"):
        pull("org/llama", root=tmp_path / "models")


def test_a_wrapped_connection_error_reports_its_cause(hub, tmp_path):
    error = errors.LocalEntryNotFoundError("Got: ConnectError: ...\nAn error happened while trying to locate the "
                                           "files on the Hub. Please check your internet connection.")
    error.__cause__ = OSError("[Errno 101] Network is unreachable")  # as snapshot_download raises it
    with pytest.raises(ValueError, match=r"download org/llama \(\[Errno 101\] Network is unreachable\); check"):
        pull("org/llama", root=tmp_path, download=FakeHub(hub, error))


REFUSED_TOKEN = r"^the Hugging Face Hub refused the access token for org/llama \(401 Client Error\); check --token"
HUB_DOWN = r"^cannot reach the Hugging Face Hub to download org/llama \(503 Server Error\); check the network"


@pytest.mark.parametrize("status, message", [(401, REFUSED_TOKEN), (503, HUB_DOWN)])
def test_other_http_errors(hub, tmp_path, status, message):
    error = hub_error(errors.HfHubHTTPError, f"{status} {'Client' if status < 500 else 'Server'} Error. For url x")
    error.response = SimpleNamespace(status_code=status)
    with pytest.raises(ValueError, match=message):
        pull("org/llama", root=tmp_path, download=FakeHub(hub, error))


@pytest.mark.parametrize("error, message", [
    (errors.RepositoryNotFoundError, r"^no model org/llama on the Hub; check the name"),
    (errors.GatedRepoError, r"^org/llama is gated: .* --token or set HF_TOKEN$"),
    (errors.RevisionNotFoundError, r"^org/llama has no revision 'v9'; check the branch, tag or commit$"),
])
def test_hub_refusals(hub, tmp_path, error, message):
    with pytest.raises(ValueError, match=message):
        pull("org/llama", root=tmp_path, revision="v9", download=FakeHub(hub, hub_error(error, "404 Client Error.")))


@pytest.mark.parametrize("repo_id", ["../evil", "a/b/c", "a--b", "", "a/.."])
def test_bad_repo_ids_are_refused_before_downloading(hub, tmp_path, repo_id):
    fake = FakeHub(hub)
    with pytest.raises(ValueError, match="is not a Hub repo id"):
        pull(repo_id, root=tmp_path, download=fake)
    assert fake.calls == []


def test_pull_a_repo_with_only_pickled_weights_keeps_the_files(hub, tmp_path):
    with pytest.raises(ValueError, match=r"^old/pickles has no safetensors weights; yunque loads only safetensors"):
        pull("old/pickles", root=tmp_path, download=FakeHub(hub))
    assert (tmp_path / "old--pickles" / "config.json").is_file()  # nothing is removed
    assert not (tmp_path / "old--pickles" / "pytorch_model.bin").exists()


def test_an_interrupted_download_says_to_pull_again(hub, tmp_path):
    class Interrupted(FakeHub):
        def __call__(self, *args, **kwargs):
            out = Path(super().__call__(*args, **kwargs))
            partial = out / ".cache/huggingface/download/abc.etag.incomplete"
            partial.parent.mkdir(parents=True)
            partial.write_bytes(b"\0")
            (out / "model.safetensors").unlink()
            return str(out)

    with pytest.raises(ValueError, match=r"^the download of org/llama is incomplete; run `yunque pull org/llama` "
                                         r"again to resume"):
        pull("org/llama", root=tmp_path, download=Interrupted(hub))


def test_catalogue_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("YUNQUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert catalogue_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert catalogue_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("YUNQUE_HOME")
    assert catalogue_dir() == tmp_path / "cache" / "yunque" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert catalogue_dir() == tmp_path / "user" / ".cache" / "yunque" / "models"
