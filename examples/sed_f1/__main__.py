from examples.sed_f1.cli import main

raise SystemExit(main())
