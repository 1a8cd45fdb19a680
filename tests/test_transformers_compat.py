"""from_pretrained's dtype keyword under the name the installed transformers takes.

transformers 4.56 renamed ``torch_dtype`` to ``dtype``; releases before it reject ``dtype``,
so the CLI and ``load_pretrained`` failed on them. The dev set has a newer transformers, so
the older name is simulated here; the whole suite ran on 4.52.4 (README, Development).
"""

import pytest
import torch
import transformers
from packaging.version import Version
from tiny import padded_batches, tiny_llama

import corda_kernels as ck
from corda_kernels import _compat, cli, export


def test_this_transformers_takes_the_name_chosen():
    new = Version(transformers.__version__).release >= (4, 56)
    assert _compat.dtype_kwarg() == ("dtype" if new else "torch_dtype")


def test_the_other_name_is_translated_and_nothing_else_moves(monkeypatch):
    for name, other in (("dtype", "torch_dtype"), ("torch_dtype", "dtype")):
        monkeypatch.setattr(_compat, "dtype_kwarg", lambda name=name: name)
        given = {other: torch.bfloat16, "local_files_only": True}
        assert _compat.from_pretrained_kwargs(given) == {name: torch.bfloat16, "local_files_only": True}
        assert given == {other: torch.bfloat16, "local_files_only": True}  # the caller's dict is not changed
        assert _compat.from_pretrained_kwargs({name: torch.float16}) == {name: torch.float16}
        with pytest.raises(ValueError, match="not both"):
            _compat.from_pretrained_kwargs({name: torch.float16, other: torch.float16})


def test_cli_and_load_pretrained_pass_the_old_name_to_old_transformers(monkeypatch, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    ck.build_corda(model, ck.collect_cov(model, padded_batches(model.config.vocab_size), progress=False), rank=2)
    export.save_pretrained(model, tmp_path / "e")
    seen = []
    real, real_name = transformers.AutoModelForCausalLM.from_pretrained.__func__, _compat.dtype_kwarg()

    def spy(cls, path, *args, **kwargs):
        seen.append(sorted(k for k in kwargs if "dtype" in k))
        kwargs = {(real_name if k == "torch_dtype" else k): v for k, v in kwargs.items()}  # the installed name
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(_compat, "dtype_kwarg", lambda: "torch_dtype")
    monkeypatch.setattr(cli, "dtype_kwarg", lambda: "torch_dtype")

    class Args:
        device, dtype = "cpu", "float32"

    cli._load_model(str(tmp_path / "m"), Args)
    export.load_pretrained(tmp_path / "e", model_class=transformers.AutoModelForCausalLM, dtype=torch.float32)
    assert seen == [["torch_dtype"], ["torch_dtype"]]
