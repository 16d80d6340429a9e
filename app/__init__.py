"""OnlineSpec Playground: the Qt application (a view over engine events)."""
from ._compat import immortalize_none

immortalize_none()
