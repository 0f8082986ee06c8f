"""Layer discovery, paths, forward order and per-layer reductions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from _utils import natural, nnx_mlp
from flax import nnx

import optax_layca as ol
from optax_layca._layers import Layering, layer_depths, resolve_layer_order

# ----------------------------------------------------------------------------- paths


def test_path_str_and_nnx_value_key():
    tree = {"Dense_0": {"kernel": 1, "bias": 2}, "scan": [3, (4,)]}
    paths = [ol.path_str(p) for p, _ in jtu.tree_flatten_with_path(tree)[0]]
    assert paths == ["Dense_0/bias", "Dense_0/kernel", "scan/0", "scan/1/0"]
    # nnx: a trailing GetAttrKey('value') (seen at init) is dropped, nothing else.
    p = (jtu.DictKey("a_out"), jtu.DictKey("kernel"), jtu.GetAttrKey("value"))
    assert ol.path_str(p) == "a_out/kernel"
    p = (jtu.GetAttrKey("value"), jtu.DictKey("kernel"))
    assert ol.path_str(p) == "value/kernel"


def test_nnx_init_and_update_paths_agree():
    model = nnx_mlp((3, 4, 2), ("z_in", "a_out"))
    state = nnx.state(model, nnx.Param)  # Variable leaves: paths end in .value
    raw = [p for p, _ in jtu.tree_flatten_with_path(state)[0]]
    assert any(isinstance(k, jtu.GetAttrKey) and k.name == "value" for k in raw[0])
    pure = nnx.to_pure_dict(state)
    assert ol.layer_paths(state) == ol.layer_paths(pure) == ("a_out/kernel", "z_in/kernel")


def test_default_is_layer():
    f32 = jnp.ones
    assert ol.default_is_layer("Dense_0/kernel", f32((3, 2)))
    assert ol.default_is_layer("Embed_0/embedding", f32((10, 4)))
    assert ol.default_is_layer("linear/w", f32(3))  # named w: a layer even when 1-d
    assert ol.default_is_layer("attn/query", f32((4, 2, 2)))  # ndim >= 2
    assert not ol.default_is_layer("Dense_0/bias", f32(3))
    assert not ol.default_is_layer("BatchNorm_0/scale", f32(3))
    # Stacked by nn.scan: still not layers.
    assert not ol.default_is_layer("stack/Dense_0/bias", f32((4, 3)))
    assert not ol.default_is_layer("stack/LayerNorm_0/scale", f32((4, 3)))
    # Integer leaves (step counters, indices) never are.
    assert not ol.default_is_layer("table/kernel", jnp.ones((2, 2), jnp.int32))


def test_natural_order():
    paths = ["Dense_10/kernel", "Dense_2/kernel", "Dense_1/kernel", "Dense_0/kernel"]
    assert ol.natural_order(paths) == (
        "Dense_0/kernel",
        "Dense_1/kernel",
        "Dense_2/kernel",
        "Dense_10/kernel",
    )
    assert sorted(paths) != list(ol.natural_order(paths))  # plain string sort gets it wrong
    mixed = [
        "block_2/conv_10/kernel",
        "block_2/conv_9/kernel",
        "block_10/conv_0/kernel",
        "block_2/conv/kernel",
    ]
    assert list(ol.natural_order(mixed)) == natural(mixed)
    nat = ol.natural_order(mixed)
    assert nat.index("block_2/conv_9/kernel") + 1 == nat.index("block_2/conv_10/kernel")
    assert nat[-1] == "block_10/conv_0/kernel"


def test_layering_layouts():
    tree = {
        "d": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "s": {"kernel": jnp.ones((5, 3, 4))},
    }
    lay = {lo.path: lo for lo in Layering(layer_axis={"s/kernel": 0}).layouts(tree)}
    assert lay["d/kernel"].reduce_axes == (0, 1) and lay["d/kernel"].stack_axis is None
    assert not lay["d/bias"].is_layer
    assert lay["s/kernel"].stack_axis == 0 and lay["s/kernel"].reduce_axes == (1, 2)
    unit = {lo.path: lo for lo in Layering(layer_axis={"s/kernel": 0}, per_unit=True).layouts(tree)}
    assert unit["d/kernel"].reduce_axes == (0,)
    assert unit["s/kernel"].reduce_axes == (1,)
    # A callable layer_axis, negative axes.
    lay = Layering(layer_axis=lambda p, x: -3 if p.startswith("s/") else None).layouts(tree)
    assert [lo.stack_axis for lo in lay if lo.is_layer] == [None, 0]
    with pytest.raises(ValueError, match=r"`layer_axis=2` is out of range for leaf 'd/kernel'"):
        Layering(layer_axis=2).layouts(tree)
    # An explicit list of paths.
    assert Layering(["d/bias"]).layer_paths(tree) == ("d/bias",)
    with pytest.raises(TypeError, match="`is_layer` must be callable"):
        Layering(3)


def test_layer_depths_with_stacks():
    params = {
        "in": {"kernel": jnp.ones((2, 2))},
        "stack": {"kernel": jnp.ones((3, 2, 2))},
        "out": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    }
    order = ["in/kernel", "stack/kernel", "out/kernel"]
    depth, total = layer_depths(params, Layering(layer_axis={"stack/kernel": 0}), order)
    assert total == 5
    assert int(depth["in"]["kernel"]) == 0
    assert np.asarray(depth["stack"]["kernel"]).ravel().tolist() == [1, 2, 3]
    assert depth["stack"]["kernel"].shape == (3, 1, 1)  # broadcasts against the leaf
    assert int(depth["out"]["kernel"]) == 4 and int(depth["out"]["bias"]) == -1
    # Hand-chosen names: the natural sort (in, out, stack) is not known to be the forward
    # order, so it is refused where depth matters and used only where it does not (α = 0).
    with pytest.raises(ValueError, match=r"`layer_order` is needed.*forward_order"):
        layer_depths(params, Layering(), None)
    depth, total = layer_depths(params, Layering(), None, need_order=False)
    assert total == 3 and int(depth["stack"]["kernel"]) == 2


def test_resolve_layer_order_errors():
    params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)} for i in range(3)}
    lay = Layering()
    assert resolve_layer_order(params, lay) == (
        "Dense_0/kernel",
        "Dense_1/kernel",
        "Dense_2/kernel",
    )
    with pytest.raises(ValueError, match=r"not layers of params: \['Dense_3/kernel'\]"):
        resolve_layer_order(
            params, lay, ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel", "Dense_3/kernel"]
        )
    with pytest.raises(ValueError, match=r"missing these layers of params: \['Dense_1/kernel'\]"):
        resolve_layer_order(params, lay, ["Dense_0/kernel", "Dense_2/kernel"])
    with pytest.raises(ValueError, match=r"more than once: \['Dense_0/kernel'\]"):
        resolve_layer_order(
            params, lay, ["Dense_0/kernel"] * 2 + ["Dense_1/kernel", "Dense_2/kernel"]
        )
    with pytest.raises(ValueError, match="No layer found in params"):
        resolve_layer_order({"b": jnp.ones(3)}, lay)


# ----------------------------------------------------------------------------- forward order


class MLP12(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(12):
            x = nn.relu(nn.Dense(4)(x))
        return x


def test_forward_order_linen_mlp_12():
    model = MLP12()
    x = jnp.ones((1, 3))
    params = model.init(jax.random.key(0), x)["params"]
    order = ol.forward_order(lambda p, x: model.apply({"params": p}, x), params, x)
    assert order == tuple(f"Dense_{i}/kernel" for i in range(12))
    assert order.index("Dense_10/kernel") == order.index("Dense_9/kernel") + 1
    # jax.tree order is not forward order; the natural sort fallback agrees here.
    assert ol.layer_paths(params)[2] == "Dense_10/kernel"
    assert ol.natural_order(ol.layer_paths(params)) == order


class ResCNN(nn.Module):
    """Names chosen so that neither tree nor natural order is the forward order."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = nn.BatchNorm(use_running_average=True, name="stem_bn")(x)
        h = nn.relu(nn.Conv(8, (3, 3), name="block_conv1")(x))
        h = nn.Conv(8, (3, 3), name="block_conv2")(h)
        shortcut = nn.Conv(8, (1, 1), name="block_shortcut")(x)
        x = nn.relu(h + shortcut)
        return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_forward_order_cnn_with_residual_shortcut():
    model = ResCNN()
    x = jnp.ones((1, 6, 6, 2))
    # Only shapes matter: abstract init (a real conv init costs seconds on a busy CPU).
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    params = variables["params"]
    apply = lambda p, x: model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
    order = ol.forward_order(apply, params, x)
    assert order == (
        "stem/kernel",
        "block_conv1/kernel",
        "block_conv2/kernel",
        "block_shortcut/kernel",
        "head/kernel",
    )
    assert ol.natural_order(order) != order


def test_forward_order_nnx():
    model = nnx_mlp((3, 4, 2), ("z_in", "a_out"))
    graphdef, state = nnx.split(model, nnx.Param)
    x = jnp.ones((1, 3))
    order = ol.forward_order(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert order == ("z_in/kernel", "a_out/kernel")
    # The same order from the pure dict (what nnx.Optimizer hands to update).
    pure = nnx.to_pure_dict(state)
    assert ol.forward_order(_pure_apply, pure, x) == order


def _pure_apply(p, x):
    h = jax.nn.relu(x @ p["z_in"]["kernel"] + p["z_in"]["bias"])
    return h @ p["a_out"]["kernel"] + p["a_out"]["bias"]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.tanh(nn.Dense(4, name="dense")(x)), None


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="z_in")(x)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="a_stack"
        )
        x, _ = stack(x, None)
        return nn.Dense(2, name="m_out")(x)


def test_forward_order_scan_and_stacked_layers():
    model = ScanNet()
    x = jnp.ones((1, 3))
    params = model.init(jax.random.key(0), x)["params"]
    assert params["a_stack"]["dense"]["kernel"].shape == (3, 4, 4)
    order = ol.forward_order(lambda p, x: model.apply({"params": p}, x), params, x)
    assert order == ("z_in/kernel", "a_stack/dense/kernel", "m_out/kernel")
    # With layer_axis=0 the stack is three layers at depths 1, 2, 3 of L = 5.
    lay = Layering(layer_axis={"a_stack/dense/kernel": 0})
    depth, total = layer_depths(params, lay, order)
    assert total == 5
    assert np.asarray(depth["a_stack"]["dense"]["kernel"]).ravel().tolist() == [1, 2, 3]
    assert int(depth["m_out"]["kernel"]) == 4
    assert int(depth["a_stack"]["dense"]["bias"]) == -1


def test_forward_order_recurses_into_sub_jaxprs():
    """remat, jit (pjit), custom_vjp, cond and while bodies; unused layers go last."""
    names = ["k_first", "j_second", "i_third", "h_fourth", "g_fifth", "f_unused_b", "e_unused_a"]
    params = {n: jnp.eye(2) for n in names}

    @jax.custom_vjp
    def cv(x, w):
        return x @ w

    cv.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def apply(p, x):
        x = jax.checkpoint(lambda x, w: x @ w)(x, p["k_first"])
        x = jax.jit(lambda x, w: jnp.tanh(x @ w))(x, p["j_second"])
        x = cv(x, p["i_third"])
        x = jax.lax.cond(x.sum() > 0, lambda x: x @ p["h_fourth"], lambda x: -x @ p["h_fourth"], x)
        x = jax.lax.fori_loop(0, 2, lambda i, x: x @ p["g_fifth"], x)
        return x

    order = ol.forward_order(apply, params, jnp.ones((1, 2)))
    assert order == (
        "k_first",
        "j_second",
        "i_third",
        "h_fourth",
        "g_fifth",
        "e_unused_a",
        "f_unused_b",
    )


def test_forward_order_is_layer_and_errors():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    apply = lambda p, x: x @ p["b"] @ p["a"]
    assert ol.forward_order(apply, params, jnp.ones((1, 2))) == ("b", "a")
    assert ol.forward_order(apply, params, jnp.ones((1, 2)), is_layer=["a"]) == ("a",)
    with pytest.raises(ValueError, match="No layer found"):
        ol.forward_order(lambda p, x: x, {"bias": jnp.ones(2)}, jnp.ones(2))


def test_forward_order_on_shape_stubs_and_literals():
    """Shape stubs (jax.eval_shape) work for params and inputs; literals in the jaxpr are skipped."""
    import jax
    import jax.numpy as jnp

    import optax_layca as ol

    stub = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    params = {"a": stub(3, 4), "b": stub(4), "c": stub(4, 2)}
    apply = lambda p, x, scale=1.0: jnp.maximum(x @ p["c"].T * 2.0, 0.0) @ p["a"].T * scale
    assert ol.layer_paths(params) == ("a", "c")
    assert ol.forward_order(apply, params, stub(1, 2), scale=3.0) == ("c", "a")


# ----------------------------------------------------------------------------- stacked depths


class _TBlock(nn.Module):
    """A transformer-like block: a norm, an "attention" and an "MLP" kernel, named so that
    alphabetical order (a_mlp < z_attn) is not the forward order (z_attn first)."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln")(x)
        x = x + nn.Dense(4, name="z_attn")(h)
        return x + nn.Dense(4, name="a_mlp")(nn.relu(x)), None


class _TNet(nn.Module):
    scan: bool = True

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(10, 4, name="embed")(tokens)
        if self.scan:
            blocks = nn.scan(_TBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=3)(name="blocks")
            x, _ = blocks(x, None)
        else:  # the same network unrolled: one module per block
            for b in range(3):
                x, _ = _TBlock(name=f"block{b}")(x, None)
        return nn.Dense(10, name="head")(x)


@functools.cache
def _tnet(scan):
    model, tokens = _TNet(scan=scan), jnp.zeros((1, 5), jnp.int32)
    # Only shapes matter: abstract init, then constant non-zero weights.
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    order = ol.forward_order(lambda p, t: model.apply({"params": p}, t), shapes, tokens)
    return jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes), order


# The expected table, written out by hand: block by block, attention before MLP in a block.
_STACKED_DEPTHS = {"embed/embedding": 0, "blocks/z_attn/kernel": [1, 3, 5],
                   "blocks/a_mlp/kernel": [2, 4, 6], "head/kernel": 7}


@pytest.mark.parametrize("layer_axis", [
    {"blocks": 0},  # the scanned module named: its path is the scan root
    {"blocks/z_attn/kernel": 0, "blocks/a_mlp/kernel": 0},  # leaf paths: root found
    lambda path, leaf: 0 if path.startswith("blocks/") else None,
])
def test_scanned_blocks_take_depths_block_by_block(layer_axis):
    params, order = _tnet(scan=True)
    assert order == ("embed/embedding", "blocks/z_attn/kernel", "blocks/a_mlp/kernel",
                     "head/kernel")
    depth, total = layer_depths(params, Layering(layer_axis=layer_axis), order)
    got = {p: np.asarray(d).ravel().tolist() for p, d in
           ((ol.path_str(k), v) for k, v in jtu.tree_flatten_with_path(depth)[0])}
    want = {p: (d if isinstance(d, list) else [d]) for p, d in _STACKED_DEPTHS.items()}
    assert {p: got[p] for p in want} == want and total == 8
    assert got["blocks/ln/scale"] == [-1] and got["blocks/z_attn/bias"] == [-1]
    # Independent reference: the same network unrolled into one module per block has these
    # depths from its traced forward order alone (no stack logic involved).
    _, unrolled = _tnet(scan=False)
    rank = {p: i for i, p in enumerate(unrolled)}
    for name in ("z_attn", "a_mlp"):
        assert got[f"blocks/{name}/kernel"] == [rank[f"block{b}/{name}/kernel"] for b in range(3)]


def test_scanned_blocks_get_their_block_multiplier():
    params, order = _tnet(scan=True)
    tx = ol.scale_by_layer_multipliers(0.5, order, layer_axis={"blocks": 0})
    ones = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(ones, tx.init(params), params)
    m = np.asarray(ol.layer_multipliers(0.5, 8))
    for path, d in _STACKED_DEPTHS.items():
        leaf = u
        for k in path.split("/"):
            leaf = leaf[k]
        got = np.asarray(leaf).reshape(np.size(d), -1)[:, 0]
        # one float32 multiply of an exact 1.0 by m: exact
        np.testing.assert_array_equal(got, m[np.atleast_1d(d)])


def test_two_scans_of_the_same_length_stay_apart():
    k = lambda n: jnp.ones((3, 4, 4))
    params = {"embed": {"embedding": jnp.ones((10, 4))},
              "enc": {"attn": {"kernel": k(0)}, "mlp": {"kernel": k(1)}},
              "dec": {"attn": {"kernel": k(2)}, "mlp": {"kernel": k(3)}},
              "head": {"kernel": jnp.ones((4, 10))}}
    order = ["embed/embedding", "enc/attn/kernel", "enc/mlp/kernel", "dec/attn/kernel",
             "dec/mlp/kernel", "head/kernel"]
    stacked = lambda path, leaf: 0 if path.split("/")[0] in ("enc", "dec") else None
    want = {"enc/attn/kernel": [1, 3, 5], "enc/mlp/kernel": [2, 4, 6],
            "dec/attn/kernel": [7, 9, 11], "dec/mlp/kernel": [8, 10, 12]}
    for spec in (stacked, {"enc": 0, "dec": 0}):
        depth, total = layer_depths(params, Layering(layer_axis=spec), order)
        assert total == 14 and int(depth["head"]["kernel"]) == 13
        got = {p: np.asarray(depth[p.split("/")[0]][p.split("/")[1]]["kernel"]).ravel().tolist()
               for p in want}
        assert got == want
    # Without the embedding and head nothing tells the two scans apart structurally: name them.
    bare = {"enc": params["enc"], "dec": params["dec"]}
    depth, _ = layer_depths(bare, Layering(layer_axis={"enc": 0, "dec": 0}), order[1:5])
    assert np.asarray(depth["dec"]["attn"]["kernel"]).ravel().tolist() == [6, 8, 10]


def test_stack_must_be_consecutive_in_layer_order():
    params, _ = _tnet(scan=True)
    order = ["embed/embedding", "blocks/z_attn/kernel", "head/kernel", "blocks/a_mlp/kernel"]
    with pytest.raises(ValueError, match=r"must be consecutive.*'head/kernel' comes between"):
        layer_depths(params, Layering(layer_axis={"blocks": 0}), order)


def test_int_layer_axis_must_hit_stacks_only():
    params, order = _tnet(scan=True)
    # The embedding (10 rows) and the head (4 rows) are not stacks of the 3 blocks.
    with pytest.raises(ValueError, match=r"`layer_axis=0` is an int.*'embed/embedding' has 10"):
        Layering(layer_axis=0).layouts(params)
    with pytest.raises(ValueError, match=r"`layer_axis=0` is an int"):
        ol.layca(0.1, layer_axis=0, layer_order=order).init(params)
    with pytest.raises(ValueError, match=r"`layer_axis=0` is an int"):
        ol.rotation.layer_rotation(params, params, layer_axis=0)
    # A tree made only of the stack takes an int.
    blocks = {"blocks": params["blocks"]}
    depth, total = layer_depths(blocks, Layering(layer_axis=0),
                                ["blocks/z_attn/kernel", "blocks/a_mlp/kernel"])
    assert total == 6
    assert np.asarray(depth["blocks"]["a_mlp"]["kernel"]).ravel().tolist() == [1, 3, 5]


# ----------------------------------------------------------------------------- natural order


def test_natural_order_is_forward_only_for_auto_numbered_siblings():
    assert ol.natural_order_is_forward([f"Dense_{i}/kernel" for i in range(12)])
    assert ol.natural_order_is_forward(["layers_0/Dense_0/kernel", "layers_0/Dense_1/kernel",
                                        "layers_1/Dense_0/kernel"])
    assert ol.natural_order_is_forward(["layers/0/kernel", "layers/10/kernel"])  # nnx.List
    assert ol.natural_order_is_forward(["only/kernel"])
    assert not ol.natural_order_is_forward(["Conv_0/kernel", "Dense_0/kernel"])
    assert not ol.natural_order_is_forward(["in/kernel", "out/kernel"])
    assert not ol.natural_order_is_forward(["Dense_0/kernel", "Dense_1/w"])


def _small_resnet():
    from optax_layca.models import SmallResNet, apply_fn

    model, x = SmallResNet(num_classes=3), jnp.zeros((1, 8, 8, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)
    return params, ol.forward_order(apply_fn(model), shapes, x)


def test_small_resnet_needs_a_traced_order():
    params, order = _small_resnet()
    assert order[0] == "stem/kernel" and order[-1] == "head/kernel"
    paths = ol.layer_paths(params)
    assert ol.natural_order(paths)[-1] == "stem/kernel"  # what the natural sort would do
    assert not ol.natural_order_is_forward(paths)
    for make in (lambda **kw: ol.layca(0.1, alpha=0.5, **kw),
                 lambda **kw: ol.scale_by_layer_multipliers(-0.5, **kw),
                 lambda **kw: ol.lars(0.1, alpha=0.5, **kw)):
        with pytest.raises(ValueError, match=r"`layer_order` is needed.*'stem/kernel'"):
            make().init(params)
        state = make(layer_order=order).init(params)
        depth = optax.tree.get(state, "layer_depth")
        assert int(depth["stem"]["kernel"]) == 0
    # α = 0 ranks nothing: no order needed.
    ol.layca(0.1).init(params)


def test_unknown_order_with_alpha_injected_later_is_nan_not_silent():
    params, _ = _small_resnet()
    tx = optax.inject_hyperparams(ol.scale_by_layer_multipliers)(alpha=0.0)
    state = tx.init(params)  # α = 0 at init: the order is not needed, so none is checked
    assert int(optax.tree.get(state, "num_layers")) == 0
    ones = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(ones, state, params)
    assert all(bool(jnp.all(x == 1)) for x in jax.tree.leaves(u))
    state.hyperparams["alpha"] = jnp.asarray(0.5)
    u, _ = tx.update(ones, state, params)
    assert bool(jnp.isnan(u["stem"]["kernel"]).all()) and bool(jnp.all(u["stem"]["bias"] == 1))


def test_lars_normalises_stacked_non_layers_per_block():
    """Under a stack a norm scale is one tensor per block (as in the unrolled network)."""
    params, order = _tnet(scan=True)
    scale = params["blocks"]["ln"]["scale"]  # (3 blocks, 4)
    c = jnp.array([1.0, 10.0, 100.0])[:, None]
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["blocks"]["ln"]["scale"] = c * scale  # parallel to each block, of different sizes
    tx = ol.lars(0.1, layer_order=order, layer_axis={"blocks": 0})
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Per block: a step of the block's own norm, -0.1 * scale_b (shrinking: no cap). One
    # float32 normalisation of a 4-vector: a few eps.
    np.testing.assert_allclose(u["blocks"]["ln"]["scale"], -0.1 * scale, rtol=1e-6)
