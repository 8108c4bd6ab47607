"""The environments tests' stand-ins: the environment API (``service``) and the
orchestrator as a real process (``orchestrator``)."""

from tests.environments_standin.orchestrator import OrchestratorProcess, orchestrator_env
from tests.environments_standin.service import EnvironmentStandIn, serve

__all__ = ["EnvironmentStandIn", "OrchestratorProcess", "orchestrator_env", "serve"]
