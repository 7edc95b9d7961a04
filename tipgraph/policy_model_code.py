"""MLflow "models from code": this file is stored with each registered version as text and
run when the version is loaded as a pyfunc, so no pickled Python object is ever stored."""

from mlflow.models import set_model

from tipgraph.policy_model import PolicyModel

set_model(PolicyModel())
