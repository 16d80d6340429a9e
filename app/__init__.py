"""OnlineSpec Playground: the Qt application (a view over engine events)."""
