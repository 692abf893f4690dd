"""Models-from-code entry of the served pyfunc model (logged as ``python_model=<this file>``).

MLflow copies this file into the logged model and runs it at load time; it names the model with
``mlflow.models.set_model``. Absolute imports only: MLflow runs it outside the package, with the staged
``dismax_plugin`` (logged in ``code_paths``) importable.
"""

import mlflow.models

from dismax_plugin.adapters.mlflow._pyfunc import DisMaxPyfuncModel

mlflow.models.set_model(DisMaxPyfuncModel())
