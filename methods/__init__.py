"""The method registry: one module per family (byol, simclr, moco_v3, moco_v2, dino, simsiam), each declaring its
methods (a base and, where it has one, its CO variant; methods/base.py says what a method declares). The method
choice, --help and the every-method tests read REGISTRY; an unknown name is an error, never another method."""
from methods import byol, dino, logo, moco_v2, moco_v3, simclr, simsiam
from models import SSLNet
from methods.base import co_section
from methods.base import HeadArgs, Method, MethodError, co_variant, forward_views, pack_views  # noqa: F401

REGISTRY = {m.name: m for module in (byol, simclr, moco_v3, dino, moco_v2, simsiam) for m in module.METHODS}
NAMES = tuple(REGISTRY)


def config_sections():
    """The config sections the methods declare, as (name, description, {key: Param})."""
    return [co_section(), logo.section(), moco_v2.section(), dino.section()]


def get(name):
    """The registered method called `name`."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method '{name}' (known: {', '.join(NAMES)})") from None


def build_net(backbone, method, proj_hidden, proj_dim, pred_hidden, local_hidden, local_grid=0, local_layer="last",
              dino_out_dim=4096, proj_out_bn="auto", pred_out_bn="auto", dino_head_bn=False):
    """The online network of `method` around `backbone`: its heads (global, and local for a CO variant) built by the
    method, in a models.SSLNet."""
    m = get(method)
    if local_layer not in ("last", "previous"):
        raise ValueError(f"local_layer must be 'last' or 'previous', got {local_layer!r}")
    if proj_out_bn != "auto" and m.own_head_form:
        raise ValueError(f"proj_out_bn={proj_out_bn!r}: {method}'s head has its own form; leave it 'auto'")
    map_stage = backbone.num_stages - 1 if local_layer == "previous" else None
    C = backbone.num_features
    a = HeadArgs(C, backbone.stage_channels(map_stage) if map_stage else C, proj_hidden, proj_dim, pred_hidden,
                 local_hidden, dino_out_dim, proj_out_bn, pred_out_bn, dino_head_bn)
    heads = [m.projector(a), m.predictor_head(a)]
    heads += [m.local_projector(a), m.local_predictor(a)] if m.local else [None, None]
    return SSLNet(backbone, method, *heads, local_grid=local_grid, map_stage=map_stage)


def table():
    """The registry as a Markdown table: name, global term, local term, config, paper, whether LoGo wraps it."""
    rows = ["| `method.name` | global term | local term | config | paper | LoGo on it |", "|---|---|---|---|---|---|"]
    for m in REGISTRY.values():
        rows.append(f"| `{m.name}` | {m.global_term} | {m.local_term if m.local else '-'} | `configs/{m.config}` | "
                    f"{m.paper} | {'yes' if m.logo_base else '-'} |")
    return "\n".join(rows)
