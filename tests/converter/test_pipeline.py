"""The whole conversion on tiny random checkpoints: file validity, exactness against the converter's own model, the
rank rule, and resume after an interruption."""
import dataclasses
import random
from pathlib import Path

import pytest
import torch

import hf_tiny
from converter import block_reconstruction as B
from converter import pipeline as P
from converter.admm import AdmmSettings
from converter.torch_model import load_nq
from nqfmt import open_nq, path_bits, rank_for_bits
from nqfmt import keys as K

TINY = P.Recipe(samples=6, seqlen=12, stat_samples=4, shrinkage=0.4, admm=AdmmSettings(iterations=8),
                mitigation=B.TuneSettings(epochs=1, batch=3, lr=1e-3),
                refinement=B.TuneSettings(epochs=1, batch=3), recon_samples=4, recon_epochs=1, recon_batch=2,
                recon_lr=5e-2, top_k=5, forward_batch=4, teacher_bf16=True)


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(P.PRESETS, "tiny", TINY)
    monkeypatch.setattr(P, "now_utc", lambda: "2026-01-01T00:00:00Z")
    return "tiny"


def calib_text(path):
    rng = random.Random(1)
    path.write_text("".join(rng.choice("ab") for _ in range(400)))
    return path


def spy_saves(monkeypatch) -> dict[str, dict]:
    """Record every checkpoint the pipeline saves, by work directory name, then file name (the saves still happen)."""
    saved: dict[str, dict] = {}
    save = P.WorkDir.save

    def spy(self, name, obj):
        saved.setdefault(self.path.name, {})[name] = obj
        save(self, name, obj)

    monkeypatch.setattr(P.WorkDir, "save", spy)
    return saved


def run(tmp_path, model_dir, out_name="m.nq", **over):
    options = P.Options(model=str(model_dir), out=tmp_path / out_name, preset="tiny",
                        calib=[calib_text(tmp_path / "calib.txt")], threads=1, **over)
    return P.convert(options)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_whole_pipeline_file_equals_converter_model(arch, tmp_path, tiny_preset):
    hf_tiny.save(arch, tmp_path / arch)
    summary = run(tmp_path, tmp_path / arch)
    nq = open_nq(summary.out)
    nq.verify()
    assert not (tmp_path / "m.nq.work").exists()
    loaded = load_nq(summary.out)
    c = nq.config
    for layer, (ours, back) in enumerate(zip(summary.model.blocks, loaded.blocks)):
        for name in K.LINEARS:
            assert torch.equal(back.linears[name].dense_weight(), ours.linears[name].dense_weight())
            assert nq.linears[layer][name].ranks == (rank_for_bits(*c.linear_shape(name), 1.0),)
    tokens = torch.randint(0, hf_tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), summary.model(tokens))
    shapes = [c.linear_shape(n) for n in K.LINEARS]
    want = sum(path_bits(m, n, rank_for_bits(m, n, 1.0)) for m, n in shapes) / sum(m * n for m, n in shapes)
    assert summary.bpw_linears == pytest.approx(want, rel=1e-12)
    assert nq.provenance.bits_achieved == pytest.approx(want, rel=1e-6)
    assert summary.bpw_file == pytest.approx(summary.out.stat().st_size * 8 / c.parameter_count())


def test_stages_change_the_result_and_can_be_switched_off(tmp_path, tiny_preset):
    hf_tiny.save("llama", tmp_path / "llama")
    full = run(tmp_path, tmp_path / "llama", "full.nq")
    bare = run(tmp_path, tmp_path / "llama", "bare.nq", error_mitigation=False, refine=False, model_recon=False)
    assert full.out.read_bytes() != bare.out.read_bytes()
    assert "model reconstruction" in full.stage_seconds and "model reconstruction" not in bare.stage_seconds
    assert "refinement" not in bare.stage_seconds and "error mitigation" not in bare.stage_seconds


def test_ctrl_c_during_the_final_rename_leaves_the_file_and_no_work_directory(tmp_path, tiny_preset, monkeypatch):
    """A Ctrl-C that the writer holds until OUT is renamed into place: OUT is whole, and the checkpoints go with
    the interrupt (nothing is left to resume)."""
    from nqfmt.writer import WrittenInterrupt
    hf_tiny.save("llama", tmp_path / "src")
    write = P.write_nq

    def interrupted_write(out, *args):
        write(out, *args)
        raise WrittenInterrupt(out)

    monkeypatch.setattr(P, "write_nq", interrupted_write)
    with pytest.raises(WrittenInterrupt):
        run(tmp_path, tmp_path / "src", "m.nq")
    open_nq(tmp_path / "m.nq").verify()  # raises if anything is missing or damaged
    assert not (tmp_path / "m.nq.work").exists()


@pytest.mark.parametrize("kill_after", ["block-001", "boundary", "teacher"])
def test_resume_after_interruption_is_byte_identical(kill_after, tmp_path, tiny_preset, monkeypatch):
    hf_tiny.save("qwen3", tmp_path / "src")
    reference = run(tmp_path, tmp_path / "src", "ref.nq").out.read_bytes()

    save = P.WorkDir.save

    def interrupting_save(self, name, obj):
        save(self, name, obj)
        if name == kill_after and (name != "boundary" or obj["next"] == 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(P.WorkDir, "save", interrupting_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tmp_path / "src", "m.nq")
    assert not (tmp_path / "m.nq").exists()
    assert (tmp_path / "m.nq.work" / f"{kill_after}.safetensors").is_file()
    monkeypatch.setattr(P.WorkDir, "save", save)
    loads = []
    load = P.WorkDir.load
    monkeypatch.setattr(P.WorkDir, "load", lambda self, name: loads.append(name) or load(self, name))
    resumed = run(tmp_path, tmp_path / "src", "m.nq", resume=True)
    assert kill_after in loads  # it continued from what the killed run saved
    assert resumed.out.read_bytes() == reference


def test_resume_refuses_other_settings(tmp_path, tiny_preset, monkeypatch):
    hf_tiny.save("llama", tmp_path / "src")
    save = P.WorkDir.save

    def interrupting_save(self, name, obj):
        save(self, name, obj)
        if name == "block-000":
            raise KeyboardInterrupt

    monkeypatch.setattr(P.WorkDir, "save", interrupting_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tmp_path / "src")
    monkeypatch.setattr(P.WorkDir, "save", save)
    with pytest.raises(P.WorkDirError, match="other settings"):
        run(tmp_path, tmp_path / "src", resume=True, seed=5)


def test_presets_are_consistent():
    for name, recipe in P.PRESETS.items():
        assert recipe.stat_samples <= recipe.samples <= recipe.windows, name
        assert recipe.windows == max(recipe.samples, recipe.recon_samples), name
    quick, standard = P.PRESETS["quick"], P.PRESETS["standard"]
    assert standard.samples * standard.seqlen >= quick.samples * quick.seqlen
    assert dataclasses.asdict(quick) != dataclasses.asdict(standard)
    for recipe in (quick, standard):  # the measured defaults: spec/CONVERTER.md, "Embedding and head", "Presets"
        assert (recipe.embedding, recipe.allocation) == ("iq4_nl+3072", "last-block")


def test_distillation_windows_beyond_the_block_stage(tmp_path, tiny_preset, monkeypatch):
    """recon_samples > samples: the blocks are tuned on the same first `samples` windows as before (identical block
    files), and the teacher cache and the distillation cover all recon_samples windows."""
    hf_tiny.save("llama", tmp_path / "src")
    saved = spy_saves(monkeypatch)
    distilled = []
    reconstruct = P.reconstruct
    monkeypatch.setattr(P, "reconstruct", lambda model, tokens, *a, **kw: distilled.append(tokens) or reconstruct(
        model, tokens, *a, **kw))
    run(tmp_path, tmp_path / "src", "few.nq")
    monkeypatch.setitem(P.PRESETS, "tiny", dataclasses.replace(TINY, recon_samples=9))
    run(tmp_path, tmp_path / "src", "many.nq")
    few, many = saved["few.nq.work"], saved["many.nq.work"]
    for layer in range(2):
        a, b = few[f"block-{layer:03d}"], many[f"block-{layer:03d}"]
        assert all(torch.equal(a[lin]["paths"][0][k], b[lin]["paths"][0][k])
                   for lin in a for k in ("u", "v", "scale_in", "scale_out"))
    assert many["boundary"]["fp"].shape[0] == 9 and many["boundary"]["q"].shape[0] == TINY.samples
    assert many["teacher"]["logp"].shape[0] == 9 and few["teacher"]["logp"].shape[0] == TINY.recon_samples
    assert [t.shape[0] for t in distilled] == [TINY.recon_samples, 9]
    assert torch.equal(distilled[1][:TINY.recon_samples], distilled[0])
    assert torch.allclose(many["teacher"]["logp"][:TINY.recon_samples], few["teacher"]["logp"])


def test_samples_override_keeps_the_presets_distillation_ratio():
    quick = P.PRESETS["quick"]
    recipe = P.Options(model="m", out=Path("o.nq"), samples=quick.samples // 2).recipe()
    assert recipe.samples == quick.samples // 2
    assert recipe.recon_samples == round(quick.recon_samples / 2)
    with pytest.raises(P.ConversionError, match="--samples"):
        P.Options(model="m", out=Path("o.nq"), samples=0).recipe()


def test_teacher_bf16_only_where_the_cpu_multiplies_bfloat16(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(B, "native_bf16", lambda: native)
        for preset in P.PRESETS:
            assert P.Options(model="m", out=Path("o.nq"), preset=preset).recipe().teacher_bf16 == native


def test_block_outputs_in_bfloat16_are_float32_and_close():
    gen = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(37, 29)
    x = torch.randn(5, 7, 37, generator=gen)
    exact, bf16 = B.block_outputs(lin, x, 2), B.block_outputs(lin, x, 2, bf16=True)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, exact)
    torch.testing.assert_close(bf16, exact, rtol=0, atol=0.05 * float(exact.abs().max()))


def _teacher_cache(teacher, tokens: torch.Tensor, stretch: float = 1.0):
    """A top-5 cache from `teacher`'s final hidden states, each block's output multiplied by `stretch`."""
    from converter.model_reconstruction import teacher_cache

    with torch.no_grad():
        h = teacher.embed(tokens)
        for blk in teacher.blocks:
            h = blk(h) * stretch
    return teacher_cache(teacher.head, h, 5, 2)


def test_distillation_tunes_only_the_scales(tmp_path, tiny_preset):
    from converter.model_reconstruction import reconstruct

    hf_tiny.save("llama", tmp_path / "llama")
    out = run(tmp_path, tmp_path / "llama", model_recon=False).out
    teacher, model = load_nq(out), load_nq(out)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    tokens = torch.randint(0, hf_tiny.VOCAB, (4, 10), generator=torch.Generator().manual_seed(5))
    cache = _teacher_cache(teacher, tokens, stretch=1.1)  # a teacher the student does not already match
    reconstruct(model, tokens, cache, 2, 2, 5e-2, 0, lambda *a: None)
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed, "nothing was tuned"
    assert all(n.endswith(("scale_in", "scale_out")) for n in changed)
    assert any(n.endswith("scale_out") for n in changed) and any(n.endswith("scale_in") for n in changed)


def test_distillation_with_the_text_cross_entropy_fits_the_text_better(tmp_path, tiny_preset):
    """ce_weight > 0 pulls the student toward the windows' real next tokens: after the same steps its cross-entropy
    on them is lower than after the KL alone."""
    from converter.model_reconstruction import next_token_ce, reconstruct

    hf_tiny.save("llama", tmp_path / "llama")
    out = run(tmp_path, tmp_path / "llama", model_recon=False).out
    teacher = load_nq(out)
    tokens = torch.randint(0, hf_tiny.VOCAB, (4, 10), generator=torch.Generator().manual_seed(7))
    cache = _teacher_cache(teacher, tokens)
    ce = {}
    for weight in (0.0, 2.0):
        model = load_nq(out)
        reconstruct(model, tokens, cache, 3, 2, 5e-2, 0, lambda *a: None, ce_weight=weight)
        with torch.no_grad():
            ce[weight] = float(next_token_ce(torch.log_softmax(model(tokens), dim=-1), tokens))
    assert ce[2.0] < ce[0.0]


def reference_kl(readout, teacher_in: torch.Tensor, student_in: torch.Tensor) -> float:
    """The float64 reference for block.output_kl: Σ_v p_T log(p_T / p_S) per token, averaged over tokens."""
    p_t = torch.softmax(readout(teacher_in).double(), -1)
    p_s = torch.softmax(readout(student_in).double(), -1)
    return float((p_t * (p_t.log() - p_s.log())).sum(-1).mean())


def test_output_kl_is_the_kl_of_the_heads_next_token_distributions():
    """block.output_kl against a float64 reference: Σ_v p_T log(p_T / p_S) per token, averaged, through a head; zero
    when the student's outputs are the teacher's."""
    gen = torch.Generator().manual_seed(11)
    embd, norm = torch.randn(53, 19, generator=gen), torch.rand(19, generator=gen) + 0.5

    def head(h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm, embd)

    targets, pred = torch.randn(7, 13, 19, generator=gen), torch.randn(3, 13, 19, generator=gen)
    idx = torch.tensor([5, 0, 2])
    objective = B.output_kl(head, targets)
    assert float(objective(pred, idx)) == pytest.approx(reference_kl(head, targets[idx], pred), rel=1e-4)
    assert float(objective(targets[idx], idx)) == pytest.approx(0.0, abs=1e-6)


def test_block_objective_reads_late_blocks_out_through_the_full_precision_blocks_after_them():
    """kl_blocks=2 of 4 blocks: blocks 0–1 keep the channel-weighted MSE; block 2's KL is read through full-precision
    block 3 and the head, block 3's through the head alone (float64 reference); the gradient reaches the block's
    output through the later block."""
    gen = torch.Generator().manual_seed(5)
    lin = lambda i, o: torch.nn.Linear(i, o).requires_grad_(False)  # noqa: E731
    later = {3: lin(19, 19)}
    head = lin(19, 53)
    targets, pred = torch.randn(7, 13, 19, generator=gen), torch.randn(3, 13, 19, generator=gen)
    idx, weight = torch.tensor([6, 1, 2]), torch.rand(19, generator=gen) + 0.1
    objective = lambda layer: B.block_objective(layer, 4, targets, weight, head, later.__getitem__, 2, False)  # noqa: E731
    assert float(objective(1)(pred, idx)) == pytest.approx(float(B.weighted_mse(pred, targets[idx], weight)))
    kl = lambda readout: reference_kl(readout, targets[idx], pred)  # noqa: E731
    assert float(objective(2)(pred, idx)) == pytest.approx(kl(lambda h: head(later[3](h))), rel=1e-4)
    assert float(objective(3)(pred, idx)) == pytest.approx(kl(head), rel=1e-4)
    assert kl(head) != pytest.approx(kl(lambda h: head(later[3](h))), rel=1e-2)
    pred.requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(2)(pred, idx), pred)
    assert grad.abs().sum() > 0


def test_kl_on_the_last_block_changes_only_it_and_fits_the_output_better(tmp_path, tiny_preset, monkeypatch):
    """kl_blocks=1: every block but the last is tuned exactly as before (identical block files); the last one is
    tuned against the head's next-token distribution, so the student's KL to the full-precision model's output on the
    calibration windows ends lower than under the channel-weighted MSE."""
    hf_tiny.save("llama", tmp_path / "src")
    monkeypatch.setitem(P.PRESETS, "tiny", dataclasses.replace(
        TINY, refinement=B.TuneSettings(epochs=8, batch=3), model_recon=False))
    saved = spy_saves(monkeypatch)
    windows = []
    draw = P.draw_windows
    monkeypatch.setattr(P, "draw_windows", lambda *a: windows.append(draw(*a)) or windows[-1])
    mse = run(tmp_path, tmp_path / "src", "mse.nq")
    monkeypatch.setitem(P.PRESETS, "tiny", dataclasses.replace(P.PRESETS["tiny"], kl_blocks=1))
    kl = run(tmp_path, tmp_path / "src", "kl.nq")
    a, b = saved["mse.nq.work"], saved["kl.nq.work"]
    assert all(torch.equal(a["block-000"][lin]["paths"][0][k], b["block-000"][lin]["paths"][0][k])
               for lin in K.LINEARS for k in ("u", "v", "scale_in", "scale_out"))
    assert not all(torch.equal(a["block-001"][lin]["paths"][0]["scale_out"],
                               b["block-001"][lin]["paths"][0]["scale_out"])
                   for lin in K.LINEARS)
    from converter.torch_model import TorchModel
    from converter.sources import open_source

    teacher = TorchModel.from_source(open_source(str(tmp_path / "src")))
    tokens = windows[0][:TINY.samples]
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(tokens), -1)
        divergence = {name: float((logp_t.exp() * (logp_t - torch.log_softmax(s.model(tokens), -1))).sum(-1).mean())
                      for name, s in (("mse", mse), ("kl", kl))}
    assert divergence["kl"] < divergence["mse"]
