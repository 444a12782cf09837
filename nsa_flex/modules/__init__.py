"""nn.Modules built on nsa_flex.functional."""

__all__: list[str] = []
