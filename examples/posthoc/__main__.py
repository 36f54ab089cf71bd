from examples.posthoc.cli import main

main()
