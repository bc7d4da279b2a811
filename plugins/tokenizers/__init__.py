"""Built-in tokenizers. Each one is a line in the hook below; add new ones there."""

import spheregen

from .patch import PatchConfig, build_patch
from .rae import RAEConfig, build_rae


@spheregen.hookimpl
def spheregen_register_tokenizers(register):
    register("patch", build_patch, PatchConfig)
    register("rae", build_rae, RAEConfig)
