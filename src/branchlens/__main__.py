from branchlens.cli import app

app(prog_name="branchlens")
