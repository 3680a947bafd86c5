"""The run's own error kinds, by what the user should do about them (experiments.run maps them to
exit statuses)."""


class RunFailure(RuntimeError):
  """A failure while running, not a mistake in the settings: a corrupt or unreadable file, a full
  disk, an error inside a library. The message names the file or directory involved."""
