from snnbench.cli import main

main()
