"""Engine.generate on a tiny random model: the KV-cached path equals recomputing every sequence at every step,
batched equals one by one, seeds fix the output, CFG, BOI/EOI placement, limits and the errors before compute."""

from __future__ import annotations

import pytest
import torch

from distributed import megatron_single_process
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST
from megafusion.inference import engine as engine_module
from megafusion.inference.engine import Engine, Prompt, PromptTooLongError
from megafusion.inference.kv_cache import CacheGroup, KVCache
from megafusion.inference.runners import CachedRunner, Segment
from megafusion.inference.settings import GenerationConfig
from tiny_model import CONTEXT, PATCH_DIM, PATCHES, VOCAB, tiny_model


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    with megatron_single_process():
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def image(seed: int, frames: int = 1) -> torch.Tensor:
    return torch.randn(frames, PATCHES, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def prompts():
    return [
        Prompt(parts=[[20, 21, 22]], seed=1, id="text-to-image", force_image=True),
        Prompt(parts=[image(5), [40, 41]], seed=2, id="captioning"),
        Prompt(parts=[[30, 31, 32, 33, 34, 35, 36], image(6, frames=2), [50]], seed=3, id="multi", force_image=True,
               frames=2),
    ]


SAMPLED = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, steps=3, cfg_scale=3.0)


def run(model, prompts, settings=SAMPLED, use_cache=True, conditioning="transfusion", context=CONTEXT):
    engine = Engine(model, vocab_size=VOCAB, context_length=context, use_cache=use_cache, conditioning=conditioning)
    return engine.generate(prompts, settings)


def assert_same(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens, (x.id, x.tokens, y.tokens)
        assert x.stop_reason == y.stop_reason and x.prompt_length == y.prompt_length
        assert len(x.media) == len(y.media)
        for m, n in zip(x.media, y.media):
            assert m.shape == n.shape
            torch.testing.assert_close(m, n, atol=atol, rtol=0)


@pytest.fixture
def boi_at(monkeypatch):
    """Make the sampler return BOI at given sampled-token counts of the prompt with a given seed ({seed: counts}):
    a model that starts images by itself, at chosen moments."""

    def install(plan):
        original = engine_module.sample_token
        counts = {}

        def sample(logits, settings, banned, generator=None):
            token = original(logits, settings, banned, generator)
            counts[generator] = counts.get(generator, 0) + 1  # each run makes fresh generators
            return ST.boi if counts[generator] in plan.get(generator.initial_seed(), ()) else token

        monkeypatch.setattr(engine_module, "sample_token", sample)

    return install


# ---------------------------------------------------------------------------------------------- cache vs recompute
def test_cached_generation_equals_recomputation(model):
    cached = run(model, prompts())
    recomputed = run(model, prompts(), use_cache=False)
    assert_same(cached, recomputed)
    assert [len(r.media) for r in cached] == [1, 0, 1]
    assert cached[2].media[0].shape == (2, PATCHES, PATCH_DIM)


def test_cached_equals_recomputation_when_the_model_starts_images_mid_text(model, boi_at):
    boi_at({1: (2, 6), 2: (4,), 3: (1,)})  # rows reach BOI at different steps: text rows wait for image rows
    settings = GenerationConfig(max_new_tokens=9, temperature=1.0, steps=2, cfg_scale=2.0, frames=2,
                                cfg_interval=(0.2, 1.0))
    cached = run(model, prompts(), settings)
    assert_same(cached, run(model, prompts(), settings, use_cache=False))
    assert [len(r.media) for r in cached] == [3, 1, 2]


def test_bagel_conditioning_cached_equals_recomputation():
    model = tiny_model(seed=1, hide_noised_latents=True)
    cached = run(model, prompts(), conditioning="bagel")
    assert_same(cached, run(model, prompts(), use_cache=False, conditioning="bagel"))
    # the hidden noised copy of every frame takes positions: prompt images count twice
    assert cached[1].prompt_length == 1 + 1 + 2 * PATCHES + 1 + 2


def test_2d_patch_positions_cached_equals_recomputation():
    model = tiny_model(seed=3, patch_position_embedding="sincos2d")
    assert_same(run(model, prompts()), run(model, prompts(), use_cache=False))


def test_mixture_of_experts_model_cached_equals_recomputation():
    from megafusion.parallel.cpu_compat import disable_cpu_compat, enable_cpu_compat

    active = enable_cpu_compat()  # megatron's MoE layer asks for CUDA streams (megafusion.parallel.cpu_compat B)
    try:
        model = tiny_model(seed=2, moe={"num_experts": 4, "router_topk": 2})
        settings = GenerationConfig(max_new_tokens=6, temperature=1.0, steps=2, cfg_scale=2.0)
        cached = run(model, prompts(), settings)
        assert_same(cached, run(model, prompts(), settings, use_cache=False))
    finally:
        if active:
            disable_cpu_compat()


@pytest.mark.parametrize("solver", ["heun", "midpoint"])
def test_second_order_solvers_cached_equals_recomputation(model, solver):
    settings = GenerationConfig(max_new_tokens=3, steps=2, solver=solver, timestep_shift=2.0, frames=2,
                                force_image=True)
    p = prompts()[:2]
    assert_same(run(model, p, settings), run(model, p, settings, use_cache=False))


# ---------------------------------------------------------------------------------------------- batching, seeds
def test_batched_prompts_equal_one_by_one(model, boi_at):
    boi_at({2: (3,)})
    batched = run(model, prompts())
    for prompt, result in zip(prompts(), batched):
        assert_same([result], run(model, [prompt]))


def test_same_seed_same_output_and_seeds_matter(model):
    a, b = run(model, prompts()), run(model, prompts())
    assert_same(a, b, atol=0)
    other = [Prompt(parts=p.parts, seed=p.seed + 100, id=p.id, force_image=p.force_image, frames=p.frames)
             for p in prompts()]
    c = run(model, other)
    assert a[0].tokens != c[0].tokens or not torch.equal(a[0].media[0], c[0].media[0])


# ---------------------------------------------------------------------------------------------- guidance
def _manual_conditional_image(model, prompt_tokens, seed, steps):
    """Euler from N(0, I) with the conditional model alone, recomputing the whole sequence without the engine."""
    from megafusion.inference.runners import build_batch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(PATCHES, PATCH_DIM, generator=g)
    prefix = [Segment(tokens=[ST.bos] + prompt_tokens + [ST.boi])]
    with torch.no_grad():
        for i in range(steps):
            t = i / steps
            batch, _ = build_batch([prefix + [Segment(latents=x, t=t)]], PATCH_DIM, "cpu")
            v = model(batch).velocity
            x = x + v / steps
    return x


def test_cfg_scale_one_is_the_conditional_model_alone(model):
    settings = GenerationConfig(max_new_tokens=0, steps=4, cfg_scale=1.0, force_image=True)
    out = run(model, [Prompt(parts=[[20, 21, 22]], seed=7)], settings)
    expected = _manual_conditional_image(model, [20, 21, 22], seed=7, steps=4)
    torch.testing.assert_close(out[0].media[0][0], expected, atol=1e-5, rtol=0)
    guided = run(model, [Prompt(parts=[[20, 21, 22]], seed=7)],
                 GenerationConfig(max_new_tokens=0, steps=4, cfg_scale=3.0, force_image=True))
    assert (guided[0].media[0] - out[0].media[0]).abs().max() > 1e-4  # guidance does change the image


def test_batched_cfg_forward_equals_two_forwards(model):
    runner = CachedRunner(model, 2, CONTEXT, torch.device("cpu"))
    with torch.no_grad():
        runner.prefill([[Segment(tokens=[ST.bos, 20, 21, ST.boi])], [Segment(tokens=[ST.bos, 30, ST.boi])]])
        phase = runner.media([0, 1], guided=True, frames=1)
        x = torch.randn(2, PATCHES, PATCH_DIM, generator=torch.Generator().manual_seed(0))
        v_cond, v_uncond = phase.velocity(x, 0.3, guided=True)
        alone, none = phase.velocity(x, 0.3, guided=False)
        assert none is None
        torch.testing.assert_close(v_cond, alone, atol=1e-5, rtol=0)
        # the unconditional rows on their own: a fresh cache, nothing before the image
        uncond = KVCache(2, PATCHES + 1)
        _, v, _ = runner._run([CacheGroup(uncond, 0, 2)], [[Segment(latents=x[i], t=0.3)] for i in range(2)],
                              [0, 0], want_logits=False, commit=False)
        torch.testing.assert_close(v_uncond, v.view(2, PATCHES, PATCH_DIM), atol=1e-5, rtol=0)
        assert (v_cond - v_uncond).abs().max() > 1e-4  # the prompt matters to the conditional branch
    assert int(runner.cache.lengths.max()) == 4  # denoising appended nothing


# ---------------------------------------------------------------------------------------------- tokens and limits
def test_boi_eoi_placement_forced_image_and_token_limit(model):
    settings = GenerationConfig(max_new_tokens=4, temperature=1.0, steps=2, force_image=True, frames=3)
    (out,) = run(model, [Prompt(parts=[[20, 21]], seed=4)], settings)
    assert out.tokens[:2] == [ST.boi, ST.eoi]
    assert out.pieces[0] == ("media", 0) and out.media[0].shape == (3, PATCHES, PATCH_DIM)
    text = [t for t in out.tokens[2:] if t not in (ST.boi, ST.eoi)]
    assert out.stop_reason == "length" and len(out.tokens) == 2 + 4
    assert all(16 <= t < VOCAB for t in text)  # no reserved id and no padded-vocabulary id is ever sampled
    assert out.prompt_length == 1 + 2 + 1  # BOS, the text, the forced BOI


def test_model_started_image_gets_eoi_and_text_resumes(model, boi_at):
    boi_at({9: (2,)})
    settings = GenerationConfig(max_new_tokens=5, temperature=1.0, steps=2)
    (out,) = run(model, [Prompt(parts=[[20]], seed=9)], settings)
    i = out.tokens.index(ST.boi)
    assert i == 1 and out.tokens[i + 1] == ST.eoi
    assert [kind for kind, _ in out.pieces] == ["text", "media", "text"]


def test_context_limit_stops_generation(model):
    settings = GenerationConfig(max_new_tokens=50, temperature=1.0)
    (out,) = run(model, [Prompt(parts=[[20] * 10], seed=1)], settings, context=16)
    assert out.stop_reason == "context" and out.prompt_length + len(out.tokens) == 16


def test_errors_before_compute(model):
    with pytest.raises(PromptTooLongError, match=r"prompt 'long' needs 101 positions but the model's context is 100"):
        run(model, [Prompt(parts=[[20] * 100], id="long")], context=100)
    with pytest.raises(PromptTooLongError, match=r"needs 97 positions \(\+ 5 for the forced image\)"):
        run(model, [Prompt(parts=[[20] * 95], id="img", force_image=True)], context=100)
    with pytest.raises(ValueError, match=r"prompt 'bad' part 0: media patches have shape \(1, 3, 16\)"):
        run(model, [Prompt(parts=[torch.zeros(1, 3, 16)], id="bad")])
    with pytest.raises(ValueError, match=r"token ids \[999\] outside the vocabulary"):
        run(model, [Prompt(parts=[[999]], id="ids")])
    with pytest.raises(ValueError, match="hide_noised_latents"):
        Engine(model, vocab_size=VOCAB, context_length=CONTEXT, conditioning="bagel")
