"""The fine-tuning recipe, in process: lock groups against open_clip's, the text tower's groups, a fully locked
tower without a graph, layer-wise decay against EVA-CLIP's formula, the recipe flags' errors and a resume that
keeps its recipe. The trainer's own steps with these flags are tests/test_recipe_runs.py."""
import json
import math

import open_clip
import pytest
import torch

from bmc_fast.errors import ConfigError
from bmc_fast.model.clip import BMCLongCLIP
from bmc_fast.model.config import load_model_config
from bmc_fast.trainer.config import TrainConfig
from bmc_fast.trainer.param_groups import LrScales, check_schedule_takes_scales, param_groups, with_group_schedule

TEXT = {"vocab_size": 300, "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}


def _model(**overrides) -> BMCLongCLIP:
    return BMCLongCLIP(load_model_config("tiny", text=TEXT, **overrides))


def _trainable(model, prefix: str) -> set[str]:
    return {k.removeprefix(prefix) for k, p in model.named_parameters() if k.startswith(prefix) and p.requires_grad}


def test_image_lock_groups_are_open_clips():
    """For every count of unlocked groups, the image tower's trainable parameters are those open_clip's
    ``VisionTransformer.lock`` leaves trainable in a tower of the same shape (the same names)."""
    model = _model()
    v = model.cfg.vision
    theirs = open_clip.model.VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                                               layers=v.layers, heads=v.heads, mlp_ratio=v.mlp_ratio,
                                               output_dim=model.cfg.embed_dim)
    assert {k for k, _ in theirs.named_parameters()} == _trainable(model, "visual.")
    groups = v.layers + 2  # stem, L - 1 blocks, last block + ln_post, projection
    for unlocked in range(groups + 1):
        model.lock_image(unlocked)
        theirs.lock(unlocked)
        assert _trainable(model, "visual.") == {k for k, p in theirs.named_parameters() if p.requires_grad}, unlocked
        assert model.frozen["image"] == (unlocked == 0)
    assert _trainable(model, "visual.") == {k for k, _ in theirs.named_parameters()}  # all groups: all of it
    with pytest.raises(ConfigError, match=rf"--lock-image-unlocked-groups {groups + 1}: the tower has {groups} lock "
                                          rf"groups; pass 0 to {groups}"):
        model.lock_image(groups + 1, "--lock-image-unlocked-groups")


def test_text_lock_groups_count_from_the_projection_down():
    model = _model()
    layers = model.cfg.text.num_hidden_layers
    everything = _trainable(model, "text.")
    want = [set(), {"proj.0.weight", "proj.2.weight"}, {"transformer.final_norm.weight"},
            {k for k in everything if k.startswith(f"transformer.layers.{layers - 1}.")}]
    for unlocked in range(len(want)):
        model.lock_text(unlocked)
        assert _trainable(model, "text.") == set().union(*want[:unlocked + 1]), unlocked
    model.lock_text(layers + 3)
    assert _trainable(model, "text.") == everything
    assert not model.frozen["text"] and model.text.training
    with pytest.raises(ConfigError, match=rf"--lock-text-unlocked-layers {layers + 4}: the tower has {layers + 3} "
                                          rf"lock groups; pass 0 to {layers + 3}"):
        model.lock_text(layers + 4, "--lock-text-unlocked-layers")


def test_a_fully_locked_tower_runs_without_a_graph_and_without_drop_path():
    """Locked, the image tower builds no graph and draws no drop-path masks even in train mode (it embeds as in eval);
    the text tower still trains, and unlocking one group gives the graph back."""
    model = _model(vision={"drop_path": 0.5}).train()
    pixels = torch.randn(4, 3, 64, 64)
    ids, mask = torch.randint(3, 300, (4, 9)), torch.ones(4, 9, dtype=torch.long)
    torch.manual_seed(0)
    dropped = model.encode_image(pixels)
    model.lock_image()
    model.train()  # what the trainer does after an evaluation: the locked tower stays in eval
    assert not model.visual.training and model.text.training
    image, text, _ = model(pixels, ids, mask)
    assert not image.requires_grad and text.requires_grad
    with torch.no_grad():
        model.visual.eval()
        plain = model.encode_image(pixels, normalize=True)
    assert torch.equal(image, plain) and not torch.allclose(dropped, model.encode_image(pixels))
    model.lock_image(1)
    assert model.visual.training and model.encode_image(pixels).requires_grad


def test_layer_decay_and_tower_scales_follow_eva_clips_rule():
    """Each trainable parameter's group rate is lr × its tower's scale × decay^(L + 1 − layer id) (EVA-CLIP's
    LayerDecayValueAssigner over get_num_layer_for_vit), the logit scale and bias at lr; decay as open_clip decides;
    frozen parameters in no group; the uniform recipe keeps the two plain groups."""
    model = _model(init_logit_bias=-10.0)
    model.lock_text(2)  # projection and final norm train
    assert len(param_groups(model)) == 2 and "lr" not in param_groups(model)[0]
    scales = LrScales(image=0.5, text=2.0, layer_decay=0.8)
    groups = param_groups(model, scales, base_lr=1e-3)
    where = {id(p): g for g in groups for p in g["params"]}
    image_layers, text_layers = model.cfg.vision.layers, model.cfg.text.num_hidden_layers

    def eva_layer_id(name: str, layers: int) -> int:  # EVA-CLIP's get_num_layer_for_vit, our names
        if any(stem in name for stem in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "embeddings")):
            return 0
        if ".resblocks." in name or ".layers." in name:
            return int(name.split(".resblocks." if ".resblocks." in name else ".layers.")[1].split(".")[0]) + 1
        return layers + 1

    seen = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in where, name
            continue
        seen += 1
        group = where[id(param)]
        if name.startswith("visual."):
            want = 0.5 * 0.8 ** (image_layers + 1 - eva_layer_id(name, image_layers))
        elif name.startswith("text."):
            want = 2.0 * 0.8 ** (text_layers + 1 - eva_layer_id(name, text_layers))
        else:
            want = 1.0
        assert group["lr"] == pytest.approx(1e-3 * want) and group["lr_scale"] == pytest.approx(want), name
        assert (group.get("weight_decay") == 0.0) == (param.ndim < 2 or "bias" in name or "norm" in name
                                                      or "ln_" in name or "logit" in name), name
    assert seen == sum(len(g["params"]) for g in groups)
    assert where[id(model.visual.conv1.weight)]["lr_scale"] == pytest.approx(0.5 * 0.8 ** (image_layers + 1))


def test_warmup_schedulers_get_each_groups_bounds():
    groups = [{"params": [], "lr_scale": 1.0}, {"params": [], "lr_scale": 0.25}]
    config = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3}}}
    params = with_group_schedule(config, groups)["scheduler"]["params"]
    assert params == {"warmup_min_lr": [1e-5, 2.5e-6], "warmup_max_lr": [1e-3, 2.5e-4]}
    assert config["scheduler"]["params"]["warmup_max_lr"] == 1e-3  # the caller's JSON untouched
    cosine = {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_min_ratio": 0.0}}}
    assert with_group_schedule(cosine, groups) == cosine  # it scales each group's own lr
    with pytest.raises(ConfigError, match="scheduler OneCycle sets one rate for every parameter group"):
        check_schedule_takes_scales({"scheduler": {"type": "OneCycle"}}, LrScales(image=0.1))
    check_schedule_takes_scales({"scheduler": {"type": "OneCycle"}}, LrScales())


@pytest.mark.parametrize("flags,message", [
    ({"lock_image_unlocked_groups": 1}, "--lock-image-unlocked-groups 1 was given without --lock-image"),
    ({"lock_text": True, "lock_text_unlocked_layers": -1}, "--lock-text-unlocked-layers must be >= 0"),
    ({"lr_text_scale": 0.0}, "--lr-text-scale must be > 0, got 0.0: to freeze a tower pass --lock-text"),
    ({"layer_decay": 1.5}, r"--layer-decay must be in \(0, 1\], got 1.5"),
    ({"drop_path": 1.0}, r"--drop-path must be in \[0, 1\), got 1.0"),
    ({"loss": "infonce"}, "--loss must be one of"),
    ({"pretrained": "x", "image_weights": "y"}, "--pretrained initialises both towers"),
])
def test_recipe_flags_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**flags)


def test_siglip_presets_and_the_paper_presets_carry_their_inits():
    from bmc_fast.trainer.prepare import _model_config

    for name in ("bmc-longclip-l14-77", "bmc-longclip-l14-154", "bmc-longclip-l14-512"):
        assert load_model_config(name).vision.drop_path == 0.1  # the fork's timm_drop_path
    assert load_model_config("tiny").vision.drop_path == 0.0
    siglip = _model_config(TrainConfig(loss="siglip", drop_path=0.2))
    assert (siglip.init_logit_scale, siglip.init_logit_bias) == (pytest.approx(math.log(10)), -10.0)
    assert siglip.vision.drop_path == 0.2 and _model_config(TrainConfig()).init_logit_bias is None


def test_a_resume_keeps_the_runs_recipe(tmp_path):
    from bmc_fast.checkpoint.run_dir import RunDir
    from bmc_fast.trainer.resume import check_same_recipe

    run = RunDir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "train": {"loss": "siglip", "lock_image": True}}))
    check_same_recipe(run, TrainConfig(loss="siglip", lock_image=True))
    with pytest.raises(ConfigError, match=r"--resume: the run in .* was started with --loss siglip \(now clip\), "
                                          r"--lock-image True \(now False\); resume with the run's values"):
        check_same_recipe(run, TrainConfig())
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "train": {}}))  # a run from before the flags
    check_same_recipe(run, TrainConfig())


def test_pretrained_reads_an_export_and_open_clips_own_checkpoints_alike(small_data, tmp_path):
    """--pretrained from an export, from the state dict open_clip's model of that export holds (open_clip's
    safetensors) and from open_clip's training checkpoint layout (epoch_N.pt: state_dict, module. prefixes): the
    same tensors, which load_pretrained copies into a new model; another architecture or a missing bias is named."""
    import dataclasses

    from safetensors.torch import save_file

    from bmc_fast.checkpoint.export import export
    from bmc_fast.checkpoint.open_clip_compat import register_modernbert
    from bmc_fast.data.text_tokenizer import load_tokenizer
    from bmc_fast.trainer.warm_start import check_architecture, load_pretrained, pretrained_state, source_config

    tokenizer = load_tokenizer(small_data["tokenizer_dir"])
    cfg = load_model_config("tiny", init_logit_bias=-3.0).with_tokenizer(tokenizer)
    model = BMCLongCLIP(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
        model.logit_bias.fill_(-4.5)
    out = export(model, tokenizer, cfg, tmp_path / "export")
    register_modernbert()
    theirs = open_clip.create_model(f"local-dir:{out}").state_dict()  # open_clip's own model of the export
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(tmp_path / "open_clip.safetensors"))
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in theirs.items()}},
               tmp_path / "epoch_3.pt")
    ours = model.state_dict()
    for source in (out, tmp_path / "open_clip.safetensors", tmp_path / "epoch_3.pt"):
        state = pretrained_state(str(source))
        assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours), source
    fresh = BMCLongCLIP(cfg)
    load_pretrained(fresh, str(tmp_path / "epoch_3.pt"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ours.items())

    assert source_config(str(out)) == cfg and source_config(str(tmp_path / "epoch_3.pt")) is None
    check_architecture(str(out), cfg, dataclasses.replace(cfg, context_length=77, init_logit_bias=-10.0))
    other = load_model_config("tiny", vision={"layers": 2}, init_logit_bias=-3.0).with_tokenizer(tokenizer)
    with pytest.raises(ConfigError, match=r"--pretrained .* is another architecture than --preset's "
                                          r"\(\['vision.layers'\] differ\)"):
        check_architecture(str(out), cfg, other)
    with pytest.raises(ConfigError, match="has a logit bias .*: pass --loss siglip"):
        check_architecture(str(out), cfg, dataclasses.replace(cfg, init_logit_bias=None))
    with pytest.raises(ConfigError, match=r"--pretrained '.*epoch_3.pt': the state dict does not fit the model: "
                                          r"missing \[\], unexpected \['visual.transformer.resblocks.2"):
        load_pretrained(BMCLongCLIP(other), str(tmp_path / "epoch_3.pt"))
    with pytest.raises(ConfigError, match="--pretrained '/nowhere' is not an export directory"):
        pretrained_state("/nowhere")
    from bmc_fast.eval import retrieval  # which evaluates an export too, and refuses a --tag for one

    with pytest.raises(ConfigError, match=r"--tag 'step0000005': --checkpoint '.*export' is an export, which holds "
                                          r"one model"):
        retrieval.main(["--checkpoint", str(out), "--data", small_data["eval"], "--tag", "step0000005"])
