"""``base``: the backbone alone, the reference every system is compared with."""

from __future__ import annotations

from mocae.spec import BuildContext, SystemSpec


def _build(ctx: BuildContext):
    from mocae.backbones import load_backbone

    return load_backbone(ctx.backbone)


SYSTEM = SystemSpec(name="base", build=_build, fingerprint=lambda ctx: {},
                    description="the backbone alone")
