"""OnlineSpec Playground engine: lossless speculative decoding with drafts that learn online.

    import onlinespec_core as osc
    pair = osc.load_pair("demo")
    engine = osc.Engine(pair, k=4, temperature=0.0, seed=0, updater="frozen")
    out = engine.generate("def add(a, b):", max_new_tokens=64)
"""
from .driver import Driver, Event, RunControl
from .engine import Engine, EngineConfig, GenerateOutput
from .errors import OnlineSpecError
from .feedback import Round
from .models import ModelPair, load_pair
from .sampling import SamplingConfig
from .streams import StreamItem, load_stream
from .updaters import available_updaters

__all__ = ["Engine", "EngineConfig", "Event", "Driver", "RunControl", "GenerateOutput", "OnlineSpecError", "Round",
           "ModelPair", "load_pair", "SamplingConfig", "StreamItem", "load_stream",
           "available_updaters"]
__version__ = "0.1.0"
