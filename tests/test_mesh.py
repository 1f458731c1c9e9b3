import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.engine.state import state_layout
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef
from jaxllm.optim import build_optimizer


def test_axis_sizes_fill_the_free_axis_and_reject_bad_products():
    cfg = config_lib.load(None, ["mesh.data=-1", "mesh.tensor=2"]).mesh
    assert mesh_lib.resolve_axis_sizes(cfg, 8) == {"stage": 1, "data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
    with pytest.raises(UserError, match="does not divide the 8 devices"):
        mesh_lib.resolve_axis_sizes(config_lib.load(None, ["mesh.data=-1", "mesh.tensor=3"]).mesh, 8)
    with pytest.raises(UserError, match="multiply to 4, but there are 8 devices"):
        mesh_lib.resolve_axis_sizes(config_lib.load(None, ["mesh.data=2", "mesh.fsdp=2"]).mesh, 8)


def test_logical_rules_map_to_mesh_axes(devices):
    mesh = mesh_lib.make_mesh(config_lib.load(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh)
    assert mesh_lib.logical_to_spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    assert mesh_lib.logical_to_spec(("batch", "length"), mesh=mesh) == P(("data", "fsdp"))
    assert mesh_lib.logical_to_spec(("embed", "mlp"), (64, 256), mesh, drop=("fsdp",)) == P(None, "tensor")
    # A size the axis does not divide stays whole instead of failing.
    assert mesh_lib.logical_to_spec(("embed", "heads"), (64, 3), mesh) == P("fsdp")


@pytest.mark.parametrize("stage, params_sharded, grads_sharded, opt_sharded",
                         [(0, False, False, False), (1, False, False, True), (2, False, True, True),
                          (3, True, True, True)])
def test_zero_stages_are_sharding_choices(devices, stage, params_sharded, grads_sharded, opt_sharded):
    cfg = config_lib.load(None, ["mesh.data=1", "mesh.fsdp=8", f"mesh.zero_stage={stage}"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    model = ModelDef.from_config(cfg.model)
    tx, _ = build_optimizer(cfg)
    layout = state_layout(mesh, model, tx, stage)
    w_in = ("blocks", 0, "mlp", "w_in")

    def spec(tree):
        for key in w_in:
            tree = tree[key]
        return tree.spec

    assert ("fsdp" in spec(layout.state["params"])) is params_sharded
    assert ("fsdp" in spec(layout.grads)) is grads_sharded
    adam = layout.state["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert ("fsdp" in spec(adam.mu)) is opt_sharded and ("fsdp" in spec(adam.nu)) is opt_sharded
    assert adam.count.spec == P()
    per_device = sum(
        leaf.sharding.shard_shape(leaf.shape)[0] for leaf in jax.tree.leaves(layout.abstract["opt_state"])
        if leaf.ndim
    )
    assert per_device > 0
