"""qwen-operator: turns a QwenDeployment into a cache, a download Job, inference pods, a Service and monitoring."""

__version__ = "0.1.0"

GROUP = "qwen-operator.io"
VERSION = "v1alpha1"
KIND = "QwenDeployment"
PLURAL = "qwendeployments"
SINGULAR = "qwendeployment"
SHORT_NAMES = ["qwd"]
API_VERSION = f"{GROUP}/{VERSION}"
FIELD_MANAGER = "qwen-operator"
