"""One process of a 2-process CPU job (`test_mesh.py`): typed PRNG keys through `replicate`
and `split_clients` over both processes' devices; prints the uniforms they draw."""

import json
import sys

import jax

from dpfed.federated import mesh as mesh_lib


def main(port: int, process_id: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    mesh_lib.initialize_distributed(True, f"localhost:{port}", 2, process_id)
    mesh = mesh_lib.client_mesh()
    keys = jax.random.split(jax.random.key(7), 4)
    placed = mesh_lib.replicate({"one": jax.random.key(3)}, mesh)
    split = mesh_lib.split_clients(keys, mesh)
    draw = jax.jit(
        lambda one, many: (jax.random.uniform(one), jax.vmap(jax.random.uniform)(many)),
        out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    one, many = draw(placed["one"], split)
    print(json.dumps({"devices": jax.device_count(), "one": float(one.addressable_data(0)),
                      "many": many.addressable_data(0).tolist()}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
