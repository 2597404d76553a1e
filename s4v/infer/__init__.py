"""Use a trained model on video files: `s4v.load`, `s4v.read_video`, and the `s4v predict`, `s4v export`,
`s4v extract` and `s4v search` commands."""
