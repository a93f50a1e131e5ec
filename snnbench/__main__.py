from snnbench.app.cli import main

main()
