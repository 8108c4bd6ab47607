"""The environments tests' stand-ins: the environment API (``service``) and the
orchestrator as a real process (``orchestrator``)."""

from tests.standins.environments.orchestrator import OrchestratorProcess, orchestrator_env
from tests.standins.environments.service import EnvironmentStandIn, serve

__all__ = ["EnvironmentStandIn", "OrchestratorProcess", "orchestrator_env", "serve"]
